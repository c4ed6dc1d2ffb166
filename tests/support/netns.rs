//! The kernel fast path's tests in network namespaces: the network comes from
//! `testkit::topology`, the SMTP peers from `testkit::smtp_server` (re-exported here); this
//! file puts a real SMTP server in each backend namespace.

use std::net::{Ipv4Addr, SocketAddrV4};

pub use testkit::netns::*;
pub use testkit::raw_syn::send_syns;
pub use testkit::smtp_server::{Behaviour, SmtpServer};
pub use testkit::topology::*;

/// Starts an SMTP server on port 25 in every backend namespace of `topo`, named mta1, mta2, …
pub fn start_servers(topo: &Topology) -> Vec<SmtpServer> {
    topo.backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let address = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SMTP_PORT);
            let listener = ns
                .run(move || std::net::TcpListener::bind(address))
                .expect("bind the SMTP server in its namespace");
            SmtpServer::serve(&format!("mta{}", i + 1), Behaviour::default(), listener)
                .expect("start the SMTP server")
        })
        .collect()
}
