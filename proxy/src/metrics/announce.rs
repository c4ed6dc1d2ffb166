//! Announcement of services' VIPs through BIRD: the changes BIRD confirmed, and whether each
//! announced service's VIP is announced now.

use super::Family;
use crate::announce::{Announcer, CHANGES};

pub(super) fn families(announcer: &Announcer) -> Vec<Family> {
    let mut changes = Family::counter(
        "announcements",
        "VIP announcements and withdrawals BIRD confirmed, by service and action (announce, withdraw)",
    );
    for ((service, action), count) in CHANGES.lock().iter() {
        changes.count(
            vec![("service", service.clone()), ("action", action.to_string())],
            *count,
        );
    }
    let mut announced = Family::gauge(
        "service_announced",
        "1 while BIRD has the service's VIP announced (its protocol enabled), else 0; services with announce = true only",
    );
    for (service, status) in announcer.status() {
        announced.count(vec![("service", service)], u64::from(status.announced));
    }
    vec![changes, announced]
}
