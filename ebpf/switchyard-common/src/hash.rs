//! TODO(skeleton): hash
