//! Incremental checksum updates (RFC 1624) for the header fields nat rewrites, so a rewritten
//! packet never needs its checksums summed afresh — for complete checksums, and for the
//! partial ones local senders hand over a veth.
//!
//! A frame from a local sender with transmit checksum offload on (CHECKSUM_PARTIAL, see the
//! kernel's Documentation/networking/checksum-offloads.rst) carries in its TCP checksum field
//! not the checksum but the folded one's-complement sum of the pseudo-header, uncomplemented;
//! whoever completes it (a NIC, or the stack for a device without offload) sums the TCP header
//! and payload onto it. So an address change must move that seed the other way round from a
//! complete checksum (`~csum_fold(csum + ~old + new)`, as the kernel's
//! `inet_proto_csum_replace4` does with `pseudohdr` for CHECKSUM_PARTIAL), and a port change
//! must leave it alone (ports are summed when it is completed). XDP cannot read the socket
//! buffer's checksum state; a seed is recognised by its value (see `is_partial_seed`).

/// RFC 1624 incremental update, on 16-bit words exactly as they lie in the packet (one's
/// complement sums do not care about byte order as long as every word is taken alike).
#[inline(always)]
pub fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    !seed_add2(!check, old, new)
}

#[inline(always)]
pub fn csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    let check = csum_replace2(check, old as u16, new as u16);
    csum_replace2(check, (old >> 16) as u16, (new >> 16) as u16)
}

/// A partial checksum's pseudo-header seed with the address `old` replaced by `new`.
#[inline(always)]
pub fn seed_replace4(seed: u16, old: u32, new: u32) -> u16 {
    let seed = seed_add2(seed, old as u16, new as u16);
    seed_add2(seed, (old >> 16) as u16, (new >> 16) as u16)
}

/// `sum - old + new` in one's complement arithmetic.
#[inline(always)]
fn seed_add2(sum: u16, old: u16, new: u16) -> u16 {
    let mut sum = sum as u32 + (!old as u32) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// [`csum_replace4`] for an IPv6 address (four words as they lie in the packet).
#[inline(always)]
pub fn csum_replace16(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    let mut check = check;
    for i in 0..4 {
        check = csum_replace4(check, old[i], new[i]);
    }
    check
}

/// [`seed_replace4`] for an IPv6 address.
#[inline(always)]
pub fn seed_replace16(seed: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    let mut seed = seed;
    for i in 0..4 {
        seed = seed_replace4(seed, old[i], new[i]);
    }
    seed
}

/// Whether `check` is exactly the pseudo-header seed of a TCP segment of `tcp_len` bytes from
/// `saddr` to `daddr` (words as they lie in the packet): what a CHECKSUM_PARTIAL frame
/// carries. A complete checksum equals it only by a 1-in-65536 chance; see the caller.
#[inline(always)]
pub fn is_partial_seed(check: u16, saddr: u32, daddr: u32, tcp_len: u16) -> bool {
    check == pseudo_header_sum(halves(saddr) + halves(daddr), tcp_len)
}

/// [`is_partial_seed`] for IPv6 addresses: the IPv6 pseudo-header (RFC 8200 8.1) has the
/// upper-layer length and next header as 32-bit words, whose high halves are zero here, so it
/// sums like IPv4's.
#[inline(always)]
pub fn is_partial_seed6(check: u16, saddr: &[u32; 4], daddr: &[u32; 4], tcp_len: u16) -> bool {
    let mut addresses = 0;
    for i in 0..4 {
        addresses += halves(saddr[i]) + halves(daddr[i]);
    }
    check == pseudo_header_sum(addresses, tcp_len)
}

/// A 32-bit word's two 16-bit halves, summed.
#[inline(always)]
fn halves(word: u32) -> u32 {
    (word & 0xffff) + (word >> 16)
}

/// The folded sum of a pseudo-header whose address words sum to `addresses`.
#[inline(always)]
fn pseudo_header_sum(addresses: u32, tcp_len: u16) -> u16 {
    // Protocol 6 and the length as big-endian words, as they would lie in a pseudo-header.
    let mut sum = addresses + (6u16.to_be() as u32) + (tcp_len.to_be() as u32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
