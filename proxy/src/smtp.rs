//! SKELETON: smtp
