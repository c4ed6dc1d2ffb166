//! Which attach mode the XDP program gets (`[service.xdp] mode`), decided from what the kernel
//! says about the interfaces before attaching, and checked once more after a native attach.
//!
//! The plane attaches in one mode on all its interfaces: nat redirects frames between them,
//! and a native redirect needs a native program on the receiving interface too.
//!
//! Native mode sends frames with `ndo_xdp_xmit`, which some interfaces accept only when
//! prepared: a veth delivers them only while its peer runs an XDP program, Intel drivers only
//! while a native program runs on the interface itself (both show in the `NDO_XMIT` feature
//! bit). And on a veth native mode loses the checksum state of frames from local senders:
//! with transmit checksum offload on (the default) their TCP checksum field holds only the
//! pseudo-header sum (CHECKSUM_PARTIAL), a frame sent on with XDP_TX or a redirect no longer
//! says so, and the receiver discards it. Generic (skb) mode keeps the socket buffer, with its
//! checksum state, and forwards correctly everywhere.
//!
//! `auto` therefore picks native only where nothing is known to break it: a driver with
//! native XDP (and redirect, for nat) that is not a veth; generic elsewhere, saying why and
//! what would make native work. `native` refuses where it cannot forward and warns about the
//! checksum case (which it cannot see from here); `generic` is generic.

use std::fmt;

use super::netdev::{Netdev, XdpFeatures};
use crate::config::XdpMode;

/// The mode an interface is attached in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    Native,
    Generic,
}

impl fmt::Display for Attach {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Attach::Native => "native",
            Attach::Generic => "generic",
        })
    }
}

/// Why native mode would not forward correctly on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Native mode cannot forward at all (as opposed to: drops some senders' frames).
    pub blocking: bool,
    pub text: String,
}

/// What the plane does, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Attach {
        mode: Attach,
        /// Empty when native was chosen with nothing to say.
        reason: String,
        /// Said as a warning (a generic fallback, or native with a known risk).
        warn: bool,
    },
    /// `mode = "native"` where native cannot forward: the error to exit with.
    Refuse(String),
}

/// What [`Netdev`] tells about forwarding with a native program on `dev` (before attaching).
pub fn problems(dev: &Netdev, nat: bool) -> Vec<Problem> {
    let mut found = Vec::new();
    let name = &dev.name;
    let driver = dev.driver_shown();
    let Some(features) = dev.features else {
        if dev.is_veth() {
            found.push(Problem {
                blocking: false,
                text: format!(
                    "{name} is a veth and this kernel (before 6.3) cannot tell whether its peer runs the XDP program native mode needs there"
                ),
            });
        }
        return found;
    };
    if !features.has(XdpFeatures::BASIC) {
        found.push(Problem {
            blocking: true,
            text: format!("{name} (driver {driver}) has no native XDP support"),
        });
        return found;
    }
    if nat && !features.has(XdpFeatures::REDIRECT) {
        found.push(Problem {
            blocking: true,
            text: format!(
                "{name} (driver {driver}) cannot redirect in native mode, which nat forwarding needs"
            ),
        });
    }
    if dev.is_veth() {
        if !features.has(XdpFeatures::NDO_XMIT) {
            found.push(Problem {
                blocking: true,
                text: format!(
                    "{name} is a veth whose peer runs no XDP program, so frames sent out (XDP_TX) or redirected into it in native mode are never delivered (native mode needs an XDP program, an XDP_PASS one will do, on the peer)"
                ),
            });
        }
        found.push(Problem {
            blocking: false,
            text: format!(
                "{name} is a veth: native mode loses the partial-checksum state (CHECKSUM_PARTIAL) of frames from local senders with transmit checksum offload on, the default, and their receivers drop them (native mode needs those senders to send complete checksums: ethtool -K <their interface> tx off)"
            ),
        });
    }
    found
}

/// What a native program already attached everywhere shows: for nat, every interface must
/// accept redirected frames (Intel drivers start to only once their program runs).
pub fn problems_after_native_attach(dev: &Netdev) -> Option<Problem> {
    let features = dev.features?;
    (!features.has(XdpFeatures::NDO_XMIT)).then(|| Problem {
        blocking: true,
        text: format!(
            "{} (driver {}) does not accept redirected frames in native mode even with the program attached",
            dev.name,
            dev.driver_shown()
        ),
    })
}

/// The decision for `requested` given every interface's problems.
pub fn decide(requested: XdpMode, problems: &[Problem]) -> Decision {
    let blocking: Vec<&str> = texts(problems, true);
    let risky: Vec<&str> = texts(problems, false);
    match requested {
        XdpMode::Generic => Decision::Attach {
            mode: Attach::Generic,
            reason: "mode = \"generic\"".into(),
            warn: false,
        },
        XdpMode::Native if !blocking.is_empty() => Decision::Refuse(format!(
            "mode = \"native\" cannot forward here: {}. Use mode = \"auto\" (generic mode here) or mode = \"generic\"",
            blocking.join("; ")
        )),
        XdpMode::Native => Decision::Attach {
            mode: Attach::Native,
            reason: if risky.is_empty() {
                "mode = \"native\"".into()
            } else {
                format!("mode = \"native\"; beware: {}", risky.join("; "))
            },
            warn: !risky.is_empty(),
        },
        XdpMode::Auto if problems.is_empty() => Decision::Attach {
            mode: Attach::Native,
            reason: "mode = \"auto\": the driver forwards in native mode".into(),
            warn: false,
        },
        XdpMode::Auto => Decision::Attach {
            mode: Attach::Generic,
            reason: format!(
                "mode = \"auto\" chose generic (skb) mode, which forwards correctly here, because {}. Once that is fixed, set mode = \"native\" (it refuses to start where it cannot forward)",
                blocking
                    .iter()
                    .chain(&risky)
                    .copied()
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            warn: true,
        },
    }
}

fn texts(problems: &[Problem], blocking: bool) -> Vec<&str> {
    problems
        .iter()
        .filter(|p| p.blocking == blocking)
        .map(|p| p.text.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(driver: &str, features: Option<u64>) -> Netdev {
        Netdev {
            name: "eth0".into(),
            driver: Some(driver.into()),
            features: features.map(XdpFeatures),
        }
    }

    const PHYSICAL: u64 = XdpFeatures::BASIC | XdpFeatures::REDIRECT;

    #[test]
    fn auto_is_native_on_a_capable_nic_and_generic_on_any_veth() {
        let nic = problems(&dev("mlx5_core", Some(PHYSICAL)), true);
        assert!(matches!(
            decide(XdpMode::Auto, &nic),
            Decision::Attach {
                mode: Attach::Native,
                ..
            }
        ));
        // A prepared veth (peer program: NDO_XMIT) still risks local senders' checksums.
        let prepared = problems(&dev("veth", Some(PHYSICAL | XdpFeatures::NDO_XMIT)), false);
        let Decision::Attach { mode, reason, warn } = decide(XdpMode::Auto, &prepared) else {
            panic!("auto never refuses");
        };
        assert_eq!((mode, warn), (Attach::Generic, true));
        assert!(reason.contains("partial-checksum state"), "{reason}");
        assert!(!reason.contains("peer runs no XDP program"), "{reason}");
    }

    #[test]
    fn native_refuses_a_plain_veth_and_warns_on_a_prepared_one() {
        let plain = problems(&dev("veth", Some(PHYSICAL)), false);
        let Decision::Refuse(why) = decide(XdpMode::Native, &plain) else {
            panic!("native on a plain veth must refuse");
        };
        assert!(why.contains("peer runs no XDP program"), "{why}");
        let prepared = problems(&dev("veth", Some(PHYSICAL | XdpFeatures::NDO_XMIT)), false);
        assert!(matches!(
            decide(XdpMode::Native, &prepared),
            Decision::Attach {
                mode: Attach::Native,
                warn: true,
                ..
            }
        ));
    }

    #[test]
    fn without_native_support_auto_falls_back_and_native_refuses() {
        let lo = problems(&dev("", Some(0)), false);
        assert!(matches!(
            decide(XdpMode::Auto, &lo),
            Decision::Attach {
                mode: Attach::Generic,
                warn: true,
                ..
            }
        ));
        assert!(matches!(decide(XdpMode::Native, &lo), Decision::Refuse(_)));
        assert!(matches!(
            decide(XdpMode::Generic, &lo),
            Decision::Attach {
                mode: Attach::Generic,
                warn: false,
                ..
            }
        ));
    }

    #[test]
    fn nat_needs_redirect() {
        let found = problems(&dev("ice", Some(XdpFeatures::BASIC)), true);
        assert!(
            found
                .iter()
                .any(|p| p.blocking && p.text.contains("redirect"))
        );
        assert!(problems(&dev("ice", Some(XdpFeatures::BASIC)), false).is_empty());
    }
}
