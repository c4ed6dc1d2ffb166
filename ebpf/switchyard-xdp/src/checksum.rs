//! Incremental checksum updates (RFC 1624) for the header fields nat rewrites, so a rewritten
//! packet never needs its checksums summed afresh.

/// RFC 1624 incremental update, on 16-bit words exactly as they lie in the packet (one's
/// complement sums do not care about byte order as long as every word is taken alike).
#[inline(always)]
pub fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check as u32) + (!old as u32) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
pub fn csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    let check = csum_replace2(check, old as u16, new as u16);
    csum_replace2(check, (old >> 16) as u16, (new >> 16) as u16)
}
