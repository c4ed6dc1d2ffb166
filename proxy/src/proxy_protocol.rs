//! SKELETON: proxy_protocol
