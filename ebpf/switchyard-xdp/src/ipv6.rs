//! The IPv6 path: packets that are not TCP/IPv4 come here from the dispatch. Only TCP right
//! after the IPv6 header is ever considered (`parse::parse_v6`); everything else, IPv4 that is
//! not TCP included, passes to the stack untouched.

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::programs::XdpContext;

use crate::parse::parse_v6;

/// Per packet that the IPv4 path did not take.
#[inline(always)]
pub fn balance(ctx: &XdpContext) -> u32 {
    let Some(_pkt) = parse_v6(ctx) else {
        return xdp_action::XDP_PASS;
    };
    // No IPv6 VIP is served yet: TCP/IPv6 passes like everything else.
    xdp_action::XDP_PASS
}
