//! SKELETON: session
