//! The heartbeat between switchyards of one second chance: a host whose switchyard stopped
//! still answers ARP/ND, so a complete neighbour entry does not say that a peer can place the
//! packets handed to it. Each switchyard with `[announce] peers` answers a small UDP probe on
//! its peer address and `[announce] peer_port` ([`Responder`], a thread of its own, never held
//! up by the sync), and probes every other peer at each sync ([`Prober`],
//! in the sync's blocking thread, one socket, all peers at once, the wait bounded by
//! [`PROBE_WAIT`]). A peer is alive while it answered a probe within [`ALIVE_FOR`].
//!
//! A probe and its answer are [`MESSAGE_LEN`] bytes: a magic, a kind and a nonce drawn per
//! peer and probe; an answer counts only when it comes from the peer's address and port and
//! echoes the nonce of that peer's latest probe (a stale answer, or one forged without seeing
//! the probe, does not).

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;

/// How long a probe round waits for the answers, all peers together.
pub const PROBE_WAIT: Duration = Duration::from_millis(150);
/// How long an answer keeps a peer alive: probes go out at each sync (at most 1 s apart), so
/// two missed probes in a row are tolerated and the third removes the peer.
pub const ALIVE_FOR: Duration = Duration::from_secs(3);

const MAGIC: [u8; 4] = *b"SYhb";
const PROBE: u8 = 1;
const ANSWER: u8 = 2;
const MESSAGE_LEN: usize = 16;

fn message(kind: u8, nonce: u64) -> [u8; MESSAGE_LEN] {
    let mut m = [0u8; MESSAGE_LEN];
    m[..4].copy_from_slice(&MAGIC);
    m[4] = kind;
    m[8..].copy_from_slice(&nonce.to_be_bytes());
    m
}

/// The nonce of a well-formed message of `kind`.
fn parse(bytes: &[u8], kind: u8) -> Option<u64> {
    if bytes.len() != MESSAGE_LEN || bytes[..4] != MAGIC || bytes[4] != kind {
        return None;
    }
    let nonce: [u8; 8] = bytes[8..].try_into().ok()?;
    Some(u64::from_be_bytes(nonce))
}

/// Answers probes on one address, on a thread of its own (the sync, which blocks for a
/// probe's wait and on map syscalls, never holds it up), until dropped.
pub struct Responder {
    stop: Arc<AtomicBool>,
}

/// How often the responder's thread looks whether it should stop.
const STOP_CHECK: Duration = Duration::from_millis(200);

impl Responder {
    /// Binds `address` (this host's peer address and `peer_port`) and starts answering.
    pub fn start(address: SocketAddr) -> anyhow::Result<Responder> {
        let socket = UdpSocket::bind(address).with_context(|| {
            format!("binding the second chance's heartbeat on {address} ([announce] peer_port: another process has that port? choose another peer_port, the same on every host)")
        })?;
        socket.set_read_timeout(Some(STOP_CHECK))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("heartbeat".to_string())
            .spawn(move || answer(&socket, &stopped))
            .context("starting the second chance's heartbeat thread")?;
        Ok(Responder { stop })
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn answer(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        // A timeout (to look at `stop`) or an ICMP error of an earlier answer: go on.
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        if let Some(nonce) = parse(&buf[..len], PROBE) {
            let _ = socket.send_to(&message(ANSWER, nonce), from);
        }
    }
}

/// Probes the peers and remembers when each last answered.
pub struct Prober {
    socket: UdpSocket,
    nonces: RandomState,
    sent: u64,
    answered: HashMap<IpAddr, Instant>,
}

impl Prober {
    /// A prober sending from `own` (this host's peer address, any port).
    pub fn new(own: IpAddr) -> anyhow::Result<Prober> {
        let socket = UdpSocket::bind(SocketAddr::new(own, 0))
            .with_context(|| format!("a socket for the second chance's heartbeat on {own}"))?;
        Ok(Prober {
            socket,
            nonces: RandomState::new(),
            sent: 0,
            answered: HashMap::new(),
        })
    }

    /// Probes every one of `peers` on `port` and waits for their answers, at most
    /// [`PROBE_WAIT`] (less when all answer).
    pub fn probe(&mut self, peers: &[IpAddr], port: u16) {
        let mut waiting: HashMap<SocketAddr, u64> = HashMap::new();
        for &peer in peers {
            self.sent += 1;
            let nonce = self.nonces.hash_one((self.sent, peer, Instant::now()));
            let to = SocketAddr::new(peer, port);
            // A failed send (no route yet) is a missed answer.
            if self.socket.send_to(&message(PROBE, nonce), to).is_ok() {
                waiting.insert(to, nonce);
            }
        }
        let deadline = Instant::now() + PROBE_WAIT;
        let mut buf = [0u8; 64];
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.socket.set_read_timeout(Some(left)).is_err() {
                break;
            }
            let Ok((len, from)) = self.socket.recv_from(&mut buf) else {
                // Timed out, or an ICMP error of a peer that is down: keep waiting if time is left.
                continue;
            };
            if parse(&buf[..len], ANSWER).is_some_and(|n| waiting.get(&from) == Some(&n)) {
                waiting.remove(&from);
                self.answered.insert(from.ip(), Instant::now());
            }
        }
    }

    /// Whether `peer` answered within [`ALIVE_FOR`].
    pub fn alive(&self, peer: &IpAddr) -> bool {
        self.answered
            .get(peer)
            .is_some_and(|at| at.elapsed() < ALIVE_FOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn a_peer_answering_is_alive_and_one_not_answering_is_not() {
        let port = free_port();
        let responder = Responder::start(SocketAddr::new(LOOPBACK, port)).expect("responder");
        let mut prober = Prober::new(LOOPBACK).expect("prober");
        prober.probe(&[LOOPBACK], port);
        assert!(
            prober.alive(&LOOPBACK),
            "the responder's answer was not counted"
        );

        // A port nobody answers on: the wait is bounded, and the peer is not alive.
        let silent = UdpSocket::bind((LOOPBACK, 0)).expect("a socket that never answers");
        let silent_port = silent.local_addr().expect("address").port();
        let mut other = Prober::new(LOOPBACK).expect("prober");
        let started = Instant::now();
        other.probe(&[LOOPBACK], silent_port);
        let waited = started.elapsed();
        assert!(
            !other.alive(&LOOPBACK),
            "a peer that never answered counted as alive"
        );
        assert!(
            waited >= PROBE_WAIT && waited < PROBE_WAIT * 4,
            "waited {waited:?}"
        );

        // A stopped responder answers no more.
        drop(responder);
        std::thread::sleep(STOP_CHECK * 2);
        let mut after = Prober::new(LOOPBACK).expect("prober");
        after.probe(&[LOOPBACK], port);
        assert!(
            !after.alive(&LOOPBACK),
            "a dropped responder still answered"
        );
    }

    #[test]
    fn an_answer_with_another_nonce_or_from_another_port_does_not_count() {
        // A forger answers every probe it sees, but with a wrong nonce; a replayer answers
        // with the nonce of an earlier probe.
        let forger = UdpSocket::bind((LOOPBACK, 0)).expect("forger");
        let port = forger.local_addr().expect("address").port();
        let mut prober = Prober::new(LOOPBACK).expect("prober");
        let first = std::thread::spawn({
            let forger = forger.try_clone().expect("clone");
            move || {
                let mut buf = [0u8; 64];
                let (len, from) = forger.recv_from(&mut buf).expect("probe");
                let nonce = parse(&buf[..len], PROBE).expect("a probe");
                forger
                    .send_to(&message(ANSWER, nonce.wrapping_add(1)), from)
                    .expect("forged answer");
                nonce
            }
        });
        prober.probe(&[LOOPBACK], port);
        let old_nonce = first.join().expect("forger");
        assert!(
            !prober.alive(&LOOPBACK),
            "an answer with a wrong nonce counted"
        );

        let replay = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let (len, from) = forger.recv_from(&mut buf).expect("probe");
            let nonce = parse(&buf[..len], PROBE).expect("a probe");
            forger
                .send_to(&message(ANSWER, old_nonce), from)
                .expect("stale answer");
            // Another socket echoing the right nonce is not the peer's port.
            let elsewhere = UdpSocket::bind((LOOPBACK, 0)).expect("elsewhere");
            elsewhere
                .send_to(&message(ANSWER, nonce), from)
                .expect("answer from another port");
        });
        prober.probe(&[LOOPBACK], port);
        replay.join().expect("replayer");
        assert!(
            !prober.alive(&LOOPBACK),
            "a stale answer or one from another port counted"
        );
    }

    #[test]
    fn messages_of_another_kind_or_length_are_not_read() {
        assert_eq!(parse(&message(PROBE, 7), PROBE), Some(7));
        assert_eq!(parse(&message(PROBE, 7), ANSWER), None);
        assert_eq!(parse(&message(ANSWER, 7)[..15], ANSWER), None);
        let mut other = message(ANSWER, 7);
        other[0] = b'x';
        assert_eq!(parse(&other, ANSWER), None);
    }

    fn free_port() -> u16 {
        let socket = UdpSocket::bind((LOOPBACK, 0)).expect("a free port");
        socket.local_addr().expect("address").port()
    }
}
