//! TODO(skeleton): maps
