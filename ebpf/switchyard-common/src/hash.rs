//! Seedless, deterministic hashing for consistent selection: backend names (Maglev offsets and
//! skips) and client addresses (Maglev slots).
//!
//! Two hosts with the same config must choose the same backend for the same client, and the
//! kernel must agree with the proxy, so nothing here may depend on a per-process seed (as
//! `std`'s `RandomState` does). FNV-1a 64 (Fowler/Noll/Vo) walks the bytes; the murmur3 64-bit
//! finaliser then spreads FNV's weak low bits over the whole word, which matters because
//! callers reduce the result modulo a table size. Only shifts, xors and 64-bit multiplies: the
//! BPF instruction set has them all.

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Decorrelates the two hashes Maglev derives from one name (the golden-ratio constant).
const SECOND_HASH_XOR: u64 = 0x9e37_79b9_7f4a_7c15;

/// FNV-1a over `bytes`. Kernel callers pass fixed-size arrays, so the loop bound is a constant.
#[inline(always)]
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash = FNV_OFFSET_BASIS;
    for &byte in bytes {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// murmur3's `fmix64`: every input bit affects every output bit.
#[inline(always)]
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Hash of an IPv4 client address, octets in network order (`u32::to_ne_bytes` of the
/// big-endian field the kernel reads from the IP header).
#[inline(always)]
pub fn hash_ipv4(octets: [u8; 4]) -> u64 {
    fmix64(fnv1a64(&octets))
}

/// Hash of an IPv6 client address, octets in network order. Callers that may see
/// IPv4-mapped addresses (`::ffff:a.b.c.d`, from a dual-stack socket) should hash them with
/// [`hash_ipv4`] so that both data planes agree.
#[inline(always)]
pub fn hash_ipv6(octets: [u8; 16]) -> u64 {
    fmix64(fnv1a64(&octets))
}

/// The two hashes Maglev derives from a backend's name: (offset hash, skip hash).
#[inline]
pub fn name_hashes(name: &[u8]) -> (u64, u64) {
    let base = fnv1a64(name);
    (fmix64(base), fmix64(base ^ SECOND_HASH_XOR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_published_vectors() {
        // Reference values from the FNV authors' test suite.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn fmix64_is_a_bijection_on_samples_and_fixes_zero() {
        assert_eq!(fmix64(0), 0);
        assert_ne!(fmix64(1), fmix64(2));
        assert_ne!(fmix64(1), 1);
    }

    #[test]
    fn address_hashes_are_stable_and_distinct() {
        assert_eq!(hash_ipv4([127, 0, 0, 2]), hash_ipv4([127, 0, 0, 2]));
        assert_ne!(hash_ipv4([127, 0, 0, 2]), hash_ipv4([127, 0, 0, 3]));
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert_ne!(hash_ipv6(v6), hash_ipv4([0, 0, 0, 1]));
        let (a, b) = name_hashes(b"mta1");
        assert_ne!(a, b);
        assert_eq!(name_hashes(b"mta1"), (a, b));
        assert_ne!(name_hashes(b"mta2").0, a);
    }

    #[test]
    fn low_bits_are_spread_for_sequential_addresses() {
        // Sequential client addresses must not land in a handful of residues.
        let mut seen = [0u32; 16];
        for i in 0..1600u32 {
            let h = hash_ipv4((0x0a00_0000 + i).to_be_bytes());
            seen[(h % 16) as usize] += 1;
        }
        for count in seen {
            assert!(
                (60..=140).contains(&count),
                "residue count {count} of 100 expected"
            );
        }
    }
}
