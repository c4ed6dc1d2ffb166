//! TODO(skeleton): round_robin
