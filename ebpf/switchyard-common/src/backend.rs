//! The per-backend snapshot every selection algorithm reads.

/// What a selection algorithm may know about one backend at the moment of choosing.
/// Plain integers only, so the same value can be assembled from kernel maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendView {
    /// Sessions/flows currently assigned (counted from assignment, not establishment).
    pub active: u32,
    /// 1..=1000.
    pub weight: u32,
    /// 0 = unlimited.
    pub max_connections: u32,
    /// Non-zero when health checks say the backend may take new sessions.
    pub healthy: u32,
    /// Moving average of connect + greeting latency, microseconds; 0 = not measured yet.
    pub response_us: u32,
}

impl BackendView {
    /// Healthy and below its connection cap: the only backends any algorithm may choose.
    #[inline(always)]
    pub fn available(&self) -> bool {
        self.healthy != 0 && (self.max_connections == 0 || self.active < self.max_connections)
    }
}

/// Backend `b`'s view from `candidate`, if it may be chosen (not excluded, and
/// [`available`](BackendView::available)).
#[inline(always)]
pub(crate) fn available_candidate(
    candidate: &impl Fn(usize) -> Option<BackendView>,
    b: usize,
) -> Option<BackendView> {
    match candidate(b) {
        Some(view) if view.available() => Some(view),
        _ => None,
    }
}

#[cfg(test)]
impl BackendView {
    /// A healthy backend of `weight` with no sessions, no cap and no measurement yet: what
    /// every algorithm's tests build their views from.
    pub(crate) fn up(weight: u32) -> BackendView {
        BackendView {
            weight,
            healthy: 1,
            ..BackendView::default()
        }
    }
}

/// What every scoring algorithm does with backends it may not choose, checked through its
/// slice convenience at one turn (`pick_in`) on `views`, where backend 1 scores better than
/// backend 2: an unhealthy backend is skipped, an excluded one too, and one at its cap too.
#[cfg(test)]
pub(crate) fn assert_skips_unavailable_excluded_and_full(
    mut views: [BackendView; 3],
    pick_in: impl Fn(&[BackendView], &[usize]) -> Option<usize>,
) {
    views[0].healthy = 0;
    assert_eq!(pick_in(&views, &[]), Some(1));
    assert_eq!(pick_in(&views, &[1]), Some(2));
    views[2].max_connections = views[2].active.max(1);
    views[2].active = views[2].max_connections;
    assert_eq!(pick_in(&views, &[1]), None);
}

/// The view of backend `b` from a slice, unless `b` is excluded or out of range: the
/// `candidate` every algorithm's slice convenience (`pick_in`) passes to its `pick`.
#[inline(always)]
pub fn candidate_in(views: &[BackendView], exclude: &[usize], b: usize) -> Option<BackendView> {
    if exclude.contains(&b) {
        return None;
    }
    views.get(b).copied()
}
