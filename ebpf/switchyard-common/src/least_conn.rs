//! TODO(skeleton): least_conn
