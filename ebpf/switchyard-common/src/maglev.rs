//! TODO(skeleton): maglev
