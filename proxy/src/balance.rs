//! Glue between a service's backends and the selection algorithms of `switchyard_common`.
//!
//! A [`Selector`] is built once per config snapshot: it holds the service's prebuilt tables
//! (the smooth weighted round-robin table, the Maglev table) and the cursor that rotates
//! round-robin turns and least-* tie-breaking. Picking asks the caller for each backend's live
//! view (health, shared active count, response time) lazily, only for the backends an algorithm
//! looks at, and allocates nothing. The selector knows backends only by index, so it does not
//! depend on how the running state stores them.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use switchyard_common::backend::BackendView;
use switchyard_common::walk::Inline;
use switchyard_common::{hash, least_conn, least_time, maglev, round_robin, weighted_round_robin};

use crate::config::{Algorithm, BackendConfig};

/// Per-service selection state built once per snapshot (weighted table, Maglev table, cursors).
pub struct Selector {
    algorithm: Algorithm,
    /// weighted_round_robin: backend indices in smooth order. Empty for other algorithms.
    weighted: Box<[u16]>,
    /// ip_hash: the Maglev lookup table. Empty for other algorithms.
    maglev: Box<[u16]>,
    /// Round-robin position, or the turn among equally loaded backends for least_*.
    cursor: AtomicUsize,
}

impl Selector {
    pub fn new(algorithm: Algorithm, backends: &[BackendConfig]) -> Self {
        let weighted = match algorithm {
            Algorithm::WeightedRoundRobin => {
                let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
                weighted_round_robin::build_table(&weights)
            }
            _ => Vec::new(),
        };
        let maglev = match algorithm {
            Algorithm::IpHash => {
                let named: Vec<(&str, u32)> = backends
                    .iter()
                    .map(|b| (b.name.as_str(), b.weight))
                    .collect();
                maglev::build_table(&named)
            }
            _ => Vec::new(),
        };
        Self {
            algorithm,
            weighted: weighted.into_boxed_slice(),
            maglev: maglev.into_boxed_slice(),
            cursor: AtomicUsize::new(0),
        }
    }

    /// Takes over `previous`'s rotation position (a reload of the same service), so a
    /// round-robin turn or a tie-break does not start again at the first backend.
    pub fn continue_from(&self, previous: &Selector) {
        self.cursor
            .store(previous.cursor.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The service's prebuilt table, as backend indexes: the Maglev table for ip_hash, the smooth
    /// weighted table for weighted_round_robin, empty otherwise (round robin walks the backends
    /// themselves; least_* need none). The kernel path writes this very table into its maps, so
    /// both planes walk the same one.
    pub fn table(&self) -> &[u16] {
        match self.algorithm {
            Algorithm::IpHash => &self.maglev,
            Algorithm::WeightedRoundRobin => &self.weighted,
            _ => &[],
        }
    }

    /// Chooses an available (healthy, not full) backend among `count`, whose index is not in
    /// `exclude`; `view(i)` is backend `i`'s view now. Does not count the session: the caller
    /// acquires backend `i`'s active count and, if that fails (it became full), picks again
    /// with `i` excluded.
    pub fn pick(
        &self,
        count: usize,
        view: impl Fn(usize) -> BackendView,
        client: IpAddr,
        exclude: &[usize],
    ) -> Option<usize> {
        let candidate = |i: usize| -> Option<BackendView> {
            if exclude.contains(&i) || i >= count {
                return None;
            }
            Some(view(i))
        };
        match self.algorithm {
            Algorithm::RoundRobin => {
                let cursor = self.cursor.fetch_add(1, Ordering::Relaxed);
                let choice = round_robin::pick(Inline, count, cursor, candidate)?;
                self.skip_cursor(choice.advance);
                Some(choice.backend)
            }
            Algorithm::WeightedRoundRobin => {
                let table = &self.weighted;
                let cursor = self.cursor.fetch_add(1, Ordering::Relaxed);
                let entry = |i: usize| table.get(i).map(|&b| b as usize);
                let choice = weighted_round_robin::pick(
                    Inline,
                    table.len(),
                    cursor,
                    count,
                    entry,
                    candidate,
                )?;
                self.skip_cursor(choice.advance);
                Some(choice.backend)
            }
            Algorithm::LeastConn => least_conn::pick(
                Inline,
                count,
                self.cursor.fetch_add(1, Ordering::Relaxed),
                candidate,
            ),
            Algorithm::LeastTime => least_time::pick(
                Inline,
                count,
                self.cursor.fetch_add(1, Ordering::Relaxed),
                candidate,
            ),
            Algorithm::IpHash => {
                let table = &self.maglev;
                let entry = |i: usize| table.get(i).map(|&b| b as usize);
                maglev::pick(
                    Inline,
                    client_hash(client),
                    table.len(),
                    count,
                    entry,
                    candidate,
                )
            }
        }
    }

    /// Moves the cursor past table entries a pick skipped, so that a down backend's turns are
    /// spread over the following entries instead of all going to its neighbour.
    fn skip_cursor(&self, advance: usize) {
        if advance > 1 {
            self.cursor.fetch_add(advance - 1, Ordering::Relaxed);
        }
    }
}

/// The address hash both data planes use: IPv4-mapped IPv6 addresses (from a dual-stack
/// listener) hash as the IPv4 address, as the XDP program sees it.
fn client_hash(client: IpAddr) -> u64 {
    match client.to_canonical() {
        IpAddr::V4(v4) => hash::hash_ipv4(v4.octets()),
        IpAddr::V6(v6) => hash::hash_ipv6(v6.octets()),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::path::Path;

    use super::*;
    use crate::config::ServiceConfig;

    /// A service parsed from TOML, so these tests follow the config's schema as it grows,
    /// with its backends' live views (all up, none busy).
    fn service(algorithm: &str, weights: &[u32]) -> (ServiceConfig, Views) {
        let mut text = format!(
            "[[service]]\nname = \"mx\"\nlisten = \"127.0.0.1:2525\"\nalgorithm = \"{algorithm}\"\n"
        );
        for (i, weight) in weights.iter().enumerate() {
            text += &format!(
                "[[service.backend]]\nname = \"mta{i}\"\naddress = \"127.0.0.1:{}\"\nweight = {weight}\n",
                2601 + i
            );
        }
        let config =
            crate::config::parse(Path::new("balance-test.toml"), &text).expect("valid test config");
        let service = config.services[0].clone();
        let views = Views::of(&service);
        (service, views)
    }

    /// The views a session would read, changeable between picks.
    struct Views(RefCell<Vec<BackendView>>);

    impl Views {
        fn of(service: &ServiceConfig) -> Views {
            Views(RefCell::new(
                service
                    .backends
                    .iter()
                    .map(|b| BackendView {
                        active: 0,
                        weight: b.weight,
                        max_connections: b.max_connections,
                        healthy: 1,
                        response_us: 0,
                    })
                    .collect(),
            ))
        }

        fn pick(&self, selector: &Selector, client: IpAddr, exclude: &[usize]) -> Option<usize> {
            let views = self.0.borrow();
            selector.pick(views.len(), |i| views[i], client, exclude)
        }

        fn set(&self, i: usize, change: impl FnOnce(&mut BackendView)) {
            change(&mut self.0.borrow_mut()[i]);
        }
    }

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

    #[test]
    fn round_robin_takes_turns_and_skips_down_and_excluded() {
        let (config, views) = service("round_robin", &[1, 1, 1]);
        let selector = Selector::new(config.algorithm, &config.backends);
        let picks: Vec<_> = (0..6)
            .map(|_| views.pick(&selector, CLIENT, &[]).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        views.set(1, |v| v.healthy = 0);
        let picks: Vec<_> = (0..4)
            .map(|_| views.pick(&selector, CLIENT, &[]).unwrap())
            .collect();
        assert_eq!(picks, [0, 2, 0, 2]);
        assert_eq!(views.pick(&selector, CLIENT, &[0, 2]), None);
    }

    #[test]
    fn weighted_round_robin_follows_weights() {
        let (config, views) = service("weighted_round_robin", &[1, 2, 3]);
        let selector = Selector::new(config.algorithm, &config.backends);
        let mut counts = [0; 3];
        for _ in 0..600 {
            counts[views.pick(&selector, CLIENT, &[]).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 200, 300]);
    }

    #[test]
    fn least_conn_reads_the_active_counts() {
        let (config, views) = service("least_conn", &[1, 1, 1]);
        let selector = Selector::new(config.algorithm, &config.backends);
        views.set(0, |v| v.active = 3);
        views.set(2, |v| v.active = 1);
        for _ in 0..5 {
            assert_eq!(views.pick(&selector, CLIENT, &[]), Some(1));
        }
        assert_eq!(views.pick(&selector, CLIENT, &[1]), Some(2));
    }

    #[test]
    fn least_time_prefers_the_faster_backend() {
        let (config, views) = service("least_time", &[1, 1]);
        let selector = Selector::new(config.algorithm, &config.backends);
        views.set(0, |v| v.response_us = 20_000);
        views.set(1, |v| v.response_us = 500);
        for _ in 0..5 {
            assert_eq!(views.pick(&selector, CLIENT, &[]), Some(1));
        }
    }

    #[test]
    fn ip_hash_is_sticky_and_maps_v4_mapped_v6_like_v4() {
        let (config, views) = service("ip_hash", &[1, 1, 1, 1]);
        let selector = Selector::new(config.algorithm, &config.backends);
        for last in 1..=50u8 {
            let v4 = Ipv4Addr::new(198, 51, 100, last);
            let first = views.pick(&selector, IpAddr::V4(v4), &[]);
            assert!(first.is_some());
            assert_eq!(views.pick(&selector, IpAddr::V4(v4), &[]), first);
            assert_eq!(
                views.pick(&selector, IpAddr::V6(v4.to_ipv6_mapped()), &[]),
                first
            );
        }
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        assert!(views.pick(&selector, v6, &[]).is_some());
    }

    #[test]
    fn full_backends_are_not_chosen() {
        let (config, views) = service("least_conn", &[1, 1]);
        let selector = Selector::new(config.algorithm, &config.backends);
        views.set(0, |v| {
            v.max_connections = 1;
            v.active = 1;
        });
        assert_eq!(views.pick(&selector, CLIENT, &[]), Some(1));
        assert_eq!(views.pick(&selector, CLIENT, &[1]), None);
    }
}
