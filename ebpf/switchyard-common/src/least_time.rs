//! TODO(skeleton): least_time
