//! Glue between a service's backends and the selection algorithms of `switchyard_common`.
//!
//! SKELETON: interface only; implemented by the balancing work.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{Algorithm, BackendConfig};
use crate::state::Backend;

/// Per-service selection state built once per snapshot (weighted table, Maglev table, cursors).
pub struct Selector {
    algorithm: Algorithm,
}

impl Selector {
    pub fn new(algorithm: Algorithm, backends: &[BackendConfig]) -> Self {
        let _ = backends;
        Self { algorithm }
    }

    /// Chooses an available (healthy, not full) backend whose index is not in `exclude`.
    /// Returns its index in `backends`. Does not count the session: the caller acquires
    /// `backends[i].active` and, if that fails (it became full), picks again with `i` excluded.
    pub fn pick(&self, backends: &[Arc<Backend>], client: IpAddr, exclude: &[usize]) -> Option<usize> {
        let _ = (backends, client, exclude, self.algorithm);
        todo!("balancing work")
    }
}
