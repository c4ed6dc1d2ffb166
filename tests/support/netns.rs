//! The kernel fast path's tests in network namespaces: the network comes from
//! `testkit::topology`, the SMTP peers from `testkit::smtp_server` (re-exported here); this
//! file puts a real SMTP server in each backend namespace.

use std::net::{Ipv6Addr, SocketAddrV6};

pub use testkit::netns::*;
pub use testkit::ping6::ping6;
pub use testkit::raw_syn::{send_syns, send_syns_from};
pub use testkit::smtp_server::{Behaviour, SmtpServer};
pub use testkit::topology::*;

/// Starts an SMTP server on port 25 in every backend namespace of `topo`, named mta1, mta2, …,
/// listening on IPv4 and IPv6 (one dual-stack socket).
pub fn start_servers(topo: &Topology) -> Vec<SmtpServer> {
    topo.backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let address = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, SMTP_PORT, 0, 0);
            let listener = ns
                .run(move || dual_stack_listener(address))
                .expect("bind the SMTP server in its namespace");
            SmtpServer::serve(&format!("mta{}", i + 1), Behaviour::default(), listener)
                .expect("start the SMTP server")
        })
        .collect()
}

/// A listener on `address` (IPv6) that takes IPv4 connections too, whatever
/// `net.ipv6.bindv6only` says.
fn dual_stack_listener(address: SocketAddrV6) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.bind(&std::net::SocketAddr::V6(address).into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}
