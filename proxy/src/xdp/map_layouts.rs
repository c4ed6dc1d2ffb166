//! The embedded XDP object against the control plane: every map the control plane opens by
//! name (`switchyard_common::maps::names`) exists in the object, with the kind, key size and
//! value size the control plane reads and writes it with. Parsed from the object's ELF (no
//! root needed), so a renamed static or a changed layout fails here, not at run time.

use std::mem::size_of;

use switchyard_common::maps::{
    ActiveCell, BackendEntry, BackendEntry6, BackendStats, ClockCache, FlowKey, FlowKey6,
    FlowValue, ListAddr4, ListAddr6, NatReply, NatReply6, PeerMac, SecondChanceRing,
    ServiceBackend, ServiceKey, ServiceKey6, ServiceRoute, ServiceStats, ServiceValue, SourceKey,
    SourceLimits, SourceStats, SourceValue, names,
};

/// `bpf_map_type` values of the kinds the program declares.
const HASH: u32 = 1;
const ARRAY: u32 = 2;
const PERCPU_ARRAY: u32 = 6;
const LRU_HASH: u32 = 9;
const LPM_TRIE: u32 = 11;

/// Each map the control plane opens: name, kind, key size, value size, as `proxy/src/xdp/*`
/// and the test kit use them (array keys are `u32` indexes; a trie's key is its `prefix_len`
/// word and the data).
fn expected() -> Vec<(&'static str, u32, usize, usize)> {
    let index = size_of::<u32>();
    vec![
        (
            names::SERVICES,
            HASH,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
        ),
        (
            names::SERVICES6,
            HASH,
            size_of::<ServiceKey6>(),
            size_of::<ServiceValue>(),
        ),
        (names::BACKENDS, ARRAY, index, size_of::<BackendEntry>()),
        (
            names::SERVICE_BACKENDS,
            ARRAY,
            index,
            size_of::<ServiceBackend>(),
        ),
        (names::ACTIVE, ARRAY, index, size_of::<ActiveCell>()),
        (names::BACKEND_RATES, ARRAY, index, size_of::<u64>()),
        (
            names::BACKEND_STATS,
            PERCPU_ARRAY,
            index,
            size_of::<BackendStats>(),
        ),
        (
            names::SERVICE_STATS,
            PERCPU_ARRAY,
            index,
            size_of::<ServiceStats>(),
        ),
        (
            names::FLOWS,
            LRU_HASH,
            size_of::<FlowKey>(),
            size_of::<FlowValue>(),
        ),
        (
            names::FLOWS6,
            LRU_HASH,
            size_of::<FlowKey6>(),
            size_of::<FlowValue>(),
        ),
        (
            names::NAT_REPLIES,
            LRU_HASH,
            size_of::<FlowKey>(),
            size_of::<NatReply>(),
        ),
        (names::BACKENDS6, ARRAY, index, size_of::<BackendEntry6>()),
        (
            names::NAT_REPLIES6,
            LRU_HASH,
            size_of::<FlowKey6>(),
            size_of::<NatReply6>(),
        ),
        (names::MAGLEV, ARRAY, index, size_of::<u32>()),
        (names::WEIGHTED, ARRAY, index, size_of::<u32>()),
        (names::RR_CURSOR, PERCPU_ARRAY, index, size_of::<u32>()),
        (names::ADDRESS_FILTER, ARRAY, index, size_of::<u64>()),
        (
            names::CLOCK_CACHE,
            PERCPU_ARRAY,
            index,
            size_of::<ClockCache>(),
        ),
        (
            names::SERVICE_ROUTES,
            ARRAY,
            index,
            size_of::<ServiceRoute>(),
        ),
        (
            names::SOURCE_LISTS,
            LPM_TRIE,
            index + size_of::<ListAddr4>(),
            size_of::<u32>(),
        ),
        (
            names::SOURCE_LISTS6,
            LPM_TRIE,
            index + size_of::<ListAddr6>(),
            size_of::<u32>(),
        ),
        (
            names::SOURCE_LIMITS,
            ARRAY,
            index,
            size_of::<SourceLimits>(),
        ),
        (
            names::SOURCES,
            LRU_HASH,
            size_of::<SourceKey>(),
            size_of::<SourceValue>(),
        ),
        (
            names::SOURCE_STATS,
            PERCPU_ARRAY,
            index,
            size_of::<SourceStats>(),
        ),
        (
            names::SECOND_CHANCE,
            ARRAY,
            index,
            size_of::<SecondChanceRing>(),
        ),
        (
            names::PEER_MACS,
            HASH,
            size_of::<PeerMac>(),
            size_of::<u32>(),
        ),
    ]
}

/// The values of every `pub const NAME: &str = "…";` in the `names` module's source, so a name
/// added there without a row in [`expected`] fails the test.
fn declared_names() -> Vec<String> {
    let source = include_str!("../../../ebpf/switchyard-common/src/maps.rs");
    let module = source
        .split("pub mod names {")
        .nth(1)
        .and_then(|rest| rest.split('}').next())
        .expect("maps.rs declares `pub mod names`");
    module
        .lines()
        .filter_map(|line| line.trim().strip_prefix("pub const "))
        .filter_map(|decl| decl.split('"').nth(1))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_map_the_control_plane_opens_is_in_the_object_with_its_layout() {
    let Some(object) = super::object() else {
        if std::env::var("SWITCHYARD_REQUIRE_XDP").is_ok_and(|v| v == "1") {
            panic!("SWITCHYARD_REQUIRE_XDP=1 but the XDP object is not built in");
        }
        eprintln!("SKIP (map layouts NOT checked): the XDP object is not built in");
        return;
    };
    let parsed = aya_obj::Object::parse(object).expect("the embedded XDP object parses");
    let expected = expected();
    let declared = declared_names();
    assert_eq!(declared.len(), expected.len(), "names::* {declared:?}");
    for name in &declared {
        assert!(
            expected.iter().any(|(n, ..)| n == name),
            "map {name} (names::*) has no expected layout here"
        );
    }
    for (name, kind, key, value) in expected {
        let map = parsed
            .maps
            .get(name)
            .unwrap_or_else(|| panic!("the XDP object has no map {name}"));
        assert_eq!(
            (map.map_type(), map.key_size(), map.value_size()),
            (kind, key as u32, value as u32),
            "map {name}: (kind, key size, value size) in the object"
        );
    }
}
