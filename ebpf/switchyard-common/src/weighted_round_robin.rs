//! TODO(skeleton): weighted_round_robin
