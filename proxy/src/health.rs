//! SKELETON: health
