//! Pinned maps of an earlier run against the object being loaded: before `pin = true` reuses
//! the maps under the pin directory, each is compared (kind, key size, value size, entries,
//! flags) with what this object and this config define for it. A map that still matches is
//! reused; one that does not (an upgrade changed its layout, or the config its capacity) is
//! unpinned so the loader creates and pins a fresh one, with one warning per map naming the
//! cost. The program never runs on a map it would misread.
//!
//! The rule for maps whose contents depend on each other:
//! - The flow tables (`FLOWS`, `FLOWS6`), the nat reply tables (`NAT_REPLIES`, `NAT_REPLIES6`)
//!   and the per-source table (`SOURCES`) are one group, replaced together: a flow entry
//!   without its nat reply entry forwards a client's packets whose replies are never
//!   translated back, and a source's open-flow count only stays right while the flows that
//!   hold its units are the ones in the tables (a kept count for dropped flows would never
//!   come down; dropped counts for kept flows would be given back twice).
//! - `ACTIVE` is not in the group: its counts are derived data, rebuilt from whatever flow
//!   tables the start found (kept or fresh) before the program is attached (see
//!   `flows::rebuild_counts`), so replacing it alone, or keeping it while the flows go, leaves
//!   counts and flows consistent.
//! - Every other map is either counters or a table the control plane rewrites at start.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use aya::maps::MapData;
use switchyard_common::maps::names;
use tracing::warn;

/// The maps replaced together when any of them is (see the module docs).
const FLOW_GROUP: [&str; 5] = [
    names::FLOWS,
    names::FLOWS6,
    names::NAT_REPLIES,
    names::NAT_REPLIES6,
    names::SOURCES,
];

/// What the kernel needs to agree on for the program to read a map as it was built to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub kind: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, key {} B, value {} B, {} entries, flags {:#x}",
            kind_name(self.kind),
            self.key_size,
            self.value_size,
            self.max_entries,
            self.flags
        )
    }
}

/// `bpf_map_type` names as bpftool prints them, for the kinds the program declares.
fn kind_name(kind: u32) -> String {
    match kind {
        1 => "hash".into(),
        2 => "array".into(),
        6 => "percpu_array".into(),
        9 => "lru_hash".into(),
        11 => "lpm_trie".into(),
        other => format!("map type {other}"),
    }
}

/// One pinned map that does not stay.
#[derive(Debug, PartialEq, Eq)]
pub struct Replacement {
    pub name: &'static str,
    pub old: Layout,
    pub new: Layout,
    /// Replaced with this member of its group, whose layout changed (its own still matches).
    pub with: Option<&'static str>,
}

impl Replacement {
    fn describe(&self, dir: &Path) -> String {
        let why = match self.with {
            Some(other) => format!("replaced together with {other} (layout {})", self.old),
            None => format!("layout {} is now {}", self.old, self.new),
        };
        format!(
            "pinned XDP map {} in {} does not fit this switchyard: {why}: it is replaced by a fresh one: {}",
            self.name,
            dir.display(),
            cost(self.name)
        )
    }
}

/// What replacing map `name` costs the operator.
fn cost(name: &str) -> &'static str {
    match name {
        names::BACKEND_STATS | names::SERVICE_STATS | names::SOURCE_STATS => {
            "its traffic counters start again from zero"
        }
        names::FLOWS | names::FLOWS6 | names::NAT_REPLIES | names::NAT_REPLIES6 => {
            "this host's established flows lose their entries: ip_hash services adopt them through the Maglev table, clients of other services are reset"
        }
        names::SOURCES => "per-source open-flow counts and rates start again",
        names::ACTIVE => "nothing: the active counts are rebuilt from the flow tables",
        names::BACKEND_RATES => "backends' new-flow rates start again",
        _ => "nothing: switchyard rewrites this table at start",
    }
}

/// The layouts this object and config give the maps in `sized` (name → entries the loader
/// sets, `None` for the object's own), from the object's ELF.
pub fn object_layouts(
    object: &[u8],
    sized: &[(&'static str, Option<u32>)],
) -> anyhow::Result<BTreeMap<&'static str, Layout>> {
    let parsed = aya_obj::Object::parse(object).context("parsing the XDP object's maps")?;
    sized
        .iter()
        .map(|&(name, entries)| {
            let map = parsed
                .maps
                .get(name)
                .ok_or_else(|| anyhow!("the XDP object has no map {name}"))?;
            let layout = Layout {
                kind: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: entries.unwrap_or(map.max_entries()),
                flags: map.map_flags(),
            };
            Ok((name, layout))
        })
        .collect()
}

/// The layout of the map pinned at `path`, `None` when nothing is pinned there.
fn pinned_layout(name: &str, path: &Path) -> anyhow::Result<Option<Layout>> {
    if !path.exists() {
        return Ok(None);
    }
    let opened = || format!("opening the pinned XDP map {name} at {}", path.display());
    let info = MapData::from_pin(path)
        .with_context(opened)?
        .info()
        .with_context(opened)?;
    Ok(Some(Layout {
        kind: info.map_type().map_or(u32::MAX, |t| t as u32),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    }))
}

/// Which pinned maps (`found`: name → layout of what is pinned) must go for the `wanted`
/// layouts: those that differ, and the rest of the flow group with them.
pub fn plan(
    found: &BTreeMap<&'static str, Layout>,
    wanted: &BTreeMap<&'static str, Layout>,
) -> Vec<Replacement> {
    let changed = |name: &&'static str| {
        found
            .get(name)
            .is_some_and(|old| wanted.get(name).is_some_and(|new| old != new))
    };
    let group_cause = FLOW_GROUP.iter().find(|name| changed(name)).copied();
    found
        .iter()
        .filter_map(|(&name, &old)| {
            let new = *wanted.get(name)?;
            let with = if old != new {
                None
            } else if FLOW_GROUP.contains(&name) {
                Some(group_cause?)
            } else {
                return None;
            };
            Some(Replacement {
                name,
                old,
                new,
                with,
            })
        })
        .collect()
}

/// Unpins every map under `dir` that does not fit `wanted` (see [`plan`]), warning once per
/// map; the loader then creates and pins fresh ones. Returns the names replaced.
pub fn replace_stale(
    dir: &Path,
    wanted: &BTreeMap<&'static str, Layout>,
) -> anyhow::Result<Vec<&'static str>> {
    let mut found = BTreeMap::new();
    let paths: HashMap<&str, PathBuf> = wanted.keys().map(|n| (*n, dir.join(n))).collect();
    for (&name, path) in &paths {
        if let Some(layout) = pinned_layout(name, path)? {
            found.insert(name, layout);
        }
    }
    let replacements = plan(&found, wanted);
    for replacement in &replacements {
        let path = &paths[replacement.name];
        std::fs::remove_file(path).with_context(|| {
            format!(
                "unpinning the outdated XDP map {} at {}",
                replacement.name,
                path.display()
            )
        })?;
        warn!("{}", replacement.describe(dir));
    }
    Ok(replacements.iter().map(|r| r.name).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(value_size: u32, max_entries: u32) -> Layout {
        Layout {
            kind: 9,
            key_size: 16,
            value_size,
            max_entries,
            flags: 0,
        }
    }

    fn maps(entries: &[(&'static str, Layout)]) -> BTreeMap<&'static str, Layout> {
        entries.iter().copied().collect()
    }

    /// [`plan`]'s replacements as (map, replaced along with).
    fn replaced(
        found: &BTreeMap<&'static str, Layout>,
        wanted: &BTreeMap<&'static str, Layout>,
    ) -> Vec<(&'static str, Option<&'static str>)> {
        plan(found, wanted)
            .into_iter()
            .map(|r| (r.name, r.with))
            .collect()
    }

    #[test]
    fn matching_maps_stay() {
        let wanted = maps(&[
            (names::FLOWS, layout(48, 100)),
            (names::MAGLEV, layout(4, 9)),
        ]);
        assert_eq!(plan(&wanted, &wanted), vec![]);
    }

    #[test]
    fn a_changed_value_size_or_capacity_replaces_the_map_alone() {
        let wanted = maps(&[
            (names::SERVICE_STATS, layout(48, 4)),
            (names::MAGLEV, layout(4, 9)),
        ]);
        let found = maps(&[
            (names::SERVICE_STATS, layout(32, 4)),
            (names::MAGLEV, layout(4, 18)),
        ]);
        assert_eq!(
            replaced(&found, &wanted),
            vec![(names::MAGLEV, None), (names::SERVICE_STATS, None)]
        );
    }

    #[test]
    fn a_changed_flow_map_takes_its_group_but_not_active_along() {
        let wanted = maps(&[
            (names::FLOWS, layout(48, 100)),
            (names::FLOWS6, layout(48, 100)),
            (names::NAT_REPLIES, layout(24, 100)),
            (names::SOURCES, layout(16, 10)),
            (names::ACTIVE, layout(8, 64)),
        ]);
        let mut found = wanted.clone();
        found.insert(names::FLOWS6, layout(40, 100));
        // Not pinned before: nothing to replace.
        found.remove(names::NAT_REPLIES);
        assert_eq!(
            replaced(&found, &wanted),
            vec![
                (names::FLOWS, Some(names::FLOWS6)),
                (names::FLOWS6, None),
                (names::SOURCES, Some(names::FLOWS6)),
            ]
        );
    }

    #[test]
    fn the_warning_names_the_map_both_layouts_and_the_cost() {
        let replacement = Replacement {
            name: names::SERVICE_STATS,
            old: layout(32, 4),
            new: layout(48, 4),
            with: None,
        };
        let text = replacement.describe(Path::new("/sys/fs/bpf/switchyard/mail"));
        for part in [
            "SERVICE_STATS",
            "/sys/fs/bpf/switchyard/mail",
            "value 32 B",
            "value 48 B",
            "counters start again",
        ] {
            assert!(text.contains(part), "{part:?} in {text}");
        }
    }
}
