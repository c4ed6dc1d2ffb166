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

/// Whether `check` is exactly the pseudo-header seed of a TCP segment of `tcp_len` bytes from
/// `saddr` to `daddr` (words as they lie in the packet): what a CHECKSUM_PARTIAL frame
/// carries. A complete checksum equals it only by a 1-in-65536 chance; see the caller.
#[inline(always)]
pub fn is_partial_seed(check: u16, saddr: u32, daddr: u32, tcp_len: u16) -> bool {
    // Protocol 6 and the length as big-endian words, as they would lie in a pseudo-header.
    let mut sum = (saddr & 0xffff) + (saddr >> 16) + (daddr & 0xffff) + (daddr >> 16);
    sum += (6u16.to_be() as u32) + (tcp_len.to_be() as u32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    check == sum as u16
}
