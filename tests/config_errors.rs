//! The configuration as an operator meets it. In process, one table of config files runs
//! through `switchyard::config::parse`: every bad one must be rejected with an error that
//! names the file, the line and the key, and every good one (the shipped examples among them)
//! must give the summary `check` prints. Then a handful of cases run the real binary end to
//! end: `check` prints that summary or those errors and exits 0 or 1, `run` refuses a bad
//! config with the same error and never listens, and the command line itself works.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use switchyard::config;
use testkit::harness::free_addr;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// Where the in-process cases claim to live: error messages start with it.
const TABLE_FILE: &str = "/etc/switchyard/switchyard.toml";

/// One config file and what must become of it.
struct Case {
    name: &'static str,
    /// The file's text; `@PORT1@`, `@PORT2@`, ... stand for loopback ports.
    toml: String,
    expect: Expect,
}

enum Expect {
    /// Rejected, with an error on this line that mentions every fragment.
    Error(usize, &'static [&'static str]),
    /// Accepted; the summary `check` prints mentions every fragment.
    Summary(&'static [&'static str]),
}

fn rejected(
    name: &'static str,
    toml: impl Into<String>,
    line: usize,
    fragments: &'static [&'static str],
) -> Case {
    Case {
        name,
        toml: toml.into(),
        expect: Expect::Error(line, fragments),
    }
}

fn accepted(
    name: &'static str,
    toml: impl Into<String>,
    fragments: &'static [&'static str],
) -> Case {
    Case {
        name,
        toml: toml.into(),
        expect: Expect::Summary(fragments),
    }
}

/// A valid service on a free port: prefix for the cases that break one thing after it.
const GOOD_SERVICE: &str = r#"[[service]]
name = "mx"
listen = "127.0.0.1:@PORT1@"
"#;

const GOOD_BACKENDS: &str = r#"
[[service.backend]]
name = "mta1"
address = "127.0.0.1:2601"

[[service.backend]]
name = "mta2"
address = "127.0.0.1:2602"
"#;

fn service_with(extra: &str) -> String {
    format!("{GOOD_SERVICE}{extra}{GOOD_BACKENDS}")
}

const XDP_TABLE: &str = "[service.xdp]\ninterface = \"eth0\"\n";

fn xdp_service(listen: &str, extra: &str, backends: &str) -> String {
    format!(
        "[[service]]\nname = \"fast\"\nlisten = {listen}\ndataplane = \"xdp\"\n{extra}{XDP_TABLE}{backends}"
    )
}

/// `forwarding = "nat"` as the first line after an `xdp_service`'s [service.xdp] table header
/// and interface (line 7, before its backends).
const NAT: &str = "forwarding = \"nat\"\n";

/// A backend whose address does not parse, then an IPv6 one (lines 10 and 14 of an
/// `xdp_service`; 11 and 15 after [`NAT`]).
const BAD_THEN_V6_BACKENDS: &str = "\n[[service.backend]]\nname = \"bad\"\naddress = \"mta.example:25\"\n\n[[service.backend]]\nname = \"v6\"\naddress = \"[2001:db8::2]:25\"\n";

const PINNED_SECOND_XDP_SERVICE: &str = "[[service]]\nname = \"fast2\"\nlisten = \"198.18.0.101:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\npin = true\n";

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("config")
        .join(name)
}

fn read_shipped(name: &str) -> String {
    std::fs::read_to_string(shipped(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
}

/// The commented-out XDP service in the shipped switchyard.toml, uncommented: it must stay a
/// valid example.
fn shipped_xdp_example() -> String {
    let shipped_text = read_shipped("switchyard.toml");
    let start = shipped_text
        .find("# [[service]]")
        .expect("commented XDP example");
    shipped_text[start..]
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn table() -> Vec<Case> {
    vec![
        // -------------------------------------------------------------------------------
        // Files that cannot be parsed
        // The unterminated string starts on line 2, column 8.
        rejected(
            "toml_syntax_error_has_line_and_column",
            "[[service]]\nname = \"mx\nlisten = \"127.0.0.1:@PORT1@\"\n",
            2,
            &["2:", "string"],
        ),
        rejected(
            "duplicate_key_is_named_with_its_first_line",
            service_with("algorithm = \"ip_hash\"\nalgorithm = \"least_conn\"\n"),
            5,
            &["duplicate key \"algorithm\"", "first set on line 4"],
        ),
        rejected(
            "duplicate_dotted_key_is_named",
            service_with("health.kind = \"tcp\"\nhealth.kind = \"smtp\"\n"),
            5,
            &["duplicate key \"health.kind\"", "line 4"],
        ),
        rejected(
            "table_defined_twice_is_named",
            service_with("[service.health]\nkind = \"tcp\"\n[service.health]\nrise = 3\n"),
            6,
            &["table [service.health] is defined twice", "line 4"],
        ),
        // [service.backend] on line 5, [[service.backend]] on line 9.
        rejected(
            "backend_table_then_backend_array_is_explained",
            format!(
                "{GOOD_SERVICE}\n[service.backend]\nname = \"mta1\"\naddress = \"127.0.0.1:2601\"\n\n[[service.backend]]\nname = \"mta2\"\naddress = \"127.0.0.1:2602\"\n"
            ),
            9,
            &[
                "[[service.backend]] follows [service.backend] (line 5)",
                "single brackets define one table",
                "write every entry as [[service.backend]]",
            ],
        ),
        rejected(
            "backend_array_then_backend_table_is_explained",
            format!("{}\n[service.backend]\nname = \"mta3\"\n", service_with("")),
            13,
            &["[service.backend] follows [[service.backend]] (line 9)"],
        ),
        rejected(
            "single_bracket_service_table_explains_the_array_form",
            "[service]\nname = \"mx\"\nlisten = \"127.0.0.1:@PORT1@\"\n",
            1,
            &["service", "[[service]]"],
        ),
        rejected(
            "double_bracket_health_table_asks_for_single_brackets",
            service_with("[[service.health]]\nkind = \"tcp\"\n"),
            4,
            &["[[service.health]]", "write it with single brackets"],
        ),
        // -------------------------------------------------------------------------------
        // Unknown keys and wrong types (serde reports the first one)
        rejected(
            "unknown_top_level_key_lists_expected_keys",
            format!("shutdown_timout = \"5s\"\n{}", service_with("")),
            1,
            &["shutdown_timout", "shutdown_timeout", "service"],
        ),
        rejected(
            "unknown_service_key_lists_expected_keys",
            service_with("algorithmm = \"least_conn\"\n"),
            4,
            &["algorithmm", "algorithm", "proxy_protocol", "backend"],
        ),
        rejected(
            "unknown_health_key_lists_expected_keys",
            service_with("[service.health]\nkind = \"smtp\"\nhelo = \"x.example\"\n"),
            6,
            &["service.health", "helo", "ehlo", "interval"],
        ),
        rejected(
            "unknown_backend_key_lists_expected_keys",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"127.0.0.1:2601\"\nwieght = 3\n"
            ),
            8,
            &["service.backend", "wieght", "weight", "max_connections"],
        ),
        rejected(
            "unknown_xdp_key_lists_expected_keys",
            format!(
                "{GOOD_SERVICE}dataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\nattach = \"native\"\n{GOOD_BACKENDS}"
            ),
            7,
            &[
                "service.xdp",
                "attach",
                "mode",
                "forwarding",
                "flow_table_size",
            ],
        ),
        rejected(
            "weight_of_wrong_type_is_named",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"127.0.0.1:2601\"\nweight = \"3\"\n"
            ),
            8,
            &["service.backend.weight", "string"],
        ),
        rejected(
            "listen_of_wrong_type_is_named",
            format!("[[service]]\nname = \"mx\"\nlisten = 25\n{GOOD_BACKENDS}"),
            3,
            &["service.listen", "address"],
        ),
        rejected(
            "duration_without_unit_asks_for_one",
            service_with("connect_timeout = 3\n"),
            4,
            &["connect_timeout", "unit", "\"3s\""],
        ),
        rejected(
            "duration_that_does_not_parse_is_named",
            service_with("idle_timeout = \"10 parsecs\"\n"),
            4,
            &["idle_timeout", "10 parsecs"],
        ),
        // -------------------------------------------------------------------------------
        // Addresses
        rejected(
            "listen_host_name_is_rejected_with_the_form_to_use",
            format!(
                "[[service]]\nname = \"mx\"\nlisten = \"mail.example.com:25\"\n{GOOD_BACKENDS}"
            ),
            3,
            &[
                "listen",
                "mail.example.com:25",
                "not an IP address",
                "192.0.2.10:25",
            ],
        ),
        rejected(
            "listen_without_port_is_rejected",
            format!("[[service]]\nname = \"mx\"\nlisten = \"127.0.0.1\"\n{GOOD_BACKENDS}"),
            3,
            &["listen", "no port", "127.0.0.1:25"],
        ),
        rejected(
            "listen_ipv6_without_brackets_is_rejected",
            format!(
                "[[service]]\nname = \"mx\"\nlisten = [\"127.0.0.1:@PORT1@\",\n  \"2001:db8::1:x25\"]\n{GOOD_BACKENDS}"
            ),
            4,
            &["listen", "brackets", "[2001:db8::1]:25"],
        ),
        rejected(
            "listen_port_out_of_range_is_rejected",
            format!("[[service]]\nname = \"mx\"\nlisten = \"127.0.0.1:70000\"\n{GOOD_BACKENDS}"),
            3,
            &["listen", "70000", "1 and 65535"],
        ),
        rejected(
            "listen_missing_is_rejected",
            format!("[[service]]\nname = \"mx\"\n{GOOD_BACKENDS}"),
            1,
            &["service \"mx\"", "listen is missing"],
        ),
        rejected(
            "backend_host_name_is_rejected",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"mta1.example.net:25\"\n"
            ),
            7,
            &[
                "service \"mx\" backend \"mta1\"",
                "address",
                "mta1.example.net:25",
                "not an IP address",
            ],
        ),
        rejected(
            "backend_wildcard_address_is_rejected",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"0.0.0.0:25\"\n"
            ),
            7,
            &["backend \"mta1\"", "address", "wildcard"],
        ),
        rejected(
            "listen_with_scope_id_by_name_is_rejected",
            format!("[[service]]\nname = \"mx\"\nlisten = \"[fe80::1%lo]:4525\"\n{GOOD_BACKENDS}"),
            3,
            &["listen \"[fe80::1%lo]:4525\"", "scope id", "not supported"],
        ),
        rejected(
            "listen_with_scope_id_by_number_is_rejected",
            format!("[[service]]\nname = \"mx\"\nlisten = \"[fe80::1%1]:4525\"\n{GOOD_BACKENDS}"),
            3,
            &["listen \"[fe80::1%1]:4525\"", "scope id", "not supported"],
        ),
        rejected(
            "listen_link_local_without_scope_id_is_rejected",
            format!("[[service]]\nname = \"mx\"\nlisten = \"[fe80::1]:4525\"\n{GOOD_BACKENDS}"),
            3,
            &["listen [fe80::1]:4525 is link-local"],
        ),
        rejected(
            "listen_ipv4_mapped_is_rejected_with_the_ipv4_form",
            format!(
                "[[service]]\nname = \"mx\"\nlisten = \"[::ffff:127.0.0.1]:4525\"\n{GOOD_BACKENDS}"
            ),
            3,
            &[
                "listen [::ffff:127.0.0.1]:4525 is an IPv4-mapped IPv6 address",
                "\"127.0.0.1:4525\"",
            ],
        ),
        rejected(
            "listen_multicast_is_rejected",
            format!("[[service]]\nname = \"mx\"\nlisten = \"239.1.2.3:25\"\n{GOOD_BACKENDS}"),
            3,
            &["listen 239.1.2.3:25 is a multicast address"],
        ),
        rejected(
            "backend_ipv4_mapped_is_rejected",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"[::ffff:192.0.2.7]:25\"\n"
            ),
            7,
            &[
                "backend \"mta1\"",
                "address [::ffff:192.0.2.7]:25 is an IPv4-mapped",
                "\"192.0.2.7:25\"",
            ],
        ),
        rejected(
            "backend_with_scope_id_is_rejected",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"[fe80::2%eth0]:25\"\n"
            ),
            7,
            &["address \"[fe80::2%eth0]:25\"", "scope id"],
        ),
        rejected(
            "backend_multicast_is_rejected",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"224.0.0.1:25\"\n"
            ),
            7,
            &[
                "backend \"mta1\"",
                "address 224.0.0.1:25 is a multicast address",
            ],
        ),
        rejected(
            "backend_ipv6_multicast_is_rejected",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"[ff02::1]:25\"\n"
            ),
            7,
            &["address [ff02::1]:25 is a multicast address"],
        ),
        rejected(
            "backend_broadcast_is_rejected",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"255.255.255.255:25\"\n"
            ),
            7,
            &["address 255.255.255.255:25 is the broadcast address"],
        ),
        rejected(
            "duplicate_backend_address_is_rejected",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"127.0.0.1:2601\"\n\n[[service.backend]]\nname = \"mta1b\"\naddress = \"127.0.0.1:2601\"\n"
            ),
            11,
            &[
                "backend \"mta1b\"",
                "address 127.0.0.1:2601 is given twice in this service (first on line 7)",
            ],
        ),
        // -------------------------------------------------------------------------------
        // Backends that are switchyard's own listeners
        rejected(
            "backend_that_is_the_service_listener_is_rejected",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"self\"\naddress = \"127.0.0.1:@PORT1@\"\n"
            ),
            7,
            &[
                "service \"mx\" backend \"self\"",
                "is switchyard's own listen address 127.0.0.1:",
                "(service \"mx\", line 3)",
                "loop",
            ],
        ),
        rejected(
            "backend_that_is_another_services_listener_is_rejected",
            format!(
                "{}\n[[service]]\nname = \"submission\"\nlisten = \"127.0.0.1:@PORT2@\"\n\n[[service.backend]]\nname = \"to-mx\"\naddress = \"127.0.0.1:@PORT1@\"\n",
                service_with("")
            ),
            19,
            &[
                "service \"submission\" backend \"to-mx\"",
                "own listen address",
                "(service \"mx\", line 3)",
            ],
        ),
        rejected(
            "loopback_backend_behind_a_wildcard_listener_is_rejected",
            "[[service]]\nname = \"mx\"\nlisten = [\"0.0.0.0:@PORT1@\", \"[::]:@PORT1@\"]\n\n[[service.backend]]\nname = \"self\"\naddress = \"127.0.0.2:@PORT1@\"\n",
            7,
            &["backend \"self\"", "own listen address 0.0.0.0:"],
        ),
        rejected(
            "ipv6_loopback_backend_behind_an_ipv6_wildcard_is_rejected",
            "[[service]]\nname = \"mx\"\nlisten = [\"0.0.0.0:@PORT1@\", \"[::]:@PORT1@\"]\n\n[[service.backend]]\nname = \"self\"\naddress = \"[::1]:@PORT1@\"\n",
            7,
            &["backend \"self\"", "own listen address [::]:"],
        ),
        // [::] is IPv6-only; a remote address on the wildcard's port is no loop.
        accepted(
            "backends_on_a_wildcard_port_that_are_not_ours_are_accepted",
            "[[service]]\nname = \"mx\"\nlisten = [\"[::]:2525\", \"127.0.0.1:2526\"]\n\n[[service.backend]]\nname = \"v4\"\naddress = \"127.0.0.1:2525\"\n\n[[service.backend]]\nname = \"remote\"\naddress = \"[2001:db8::25]:2525\"\n",
            &[
                "backend \"v4\": 127.0.0.1:2525",
                "backend \"remote\": [2001:db8::25]:2525",
            ],
        ),
        rejected(
            "backend_address_missing_is_rejected",
            format!("{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\n"),
            5,
            &["backend \"mta1\"", "address is missing"],
        ),
        // -------------------------------------------------------------------------------
        // Unknown names for enumerated keys list the valid ones
        rejected(
            "unknown_algorithm_lists_valid_ones",
            service_with("algorithm = \"fastest\"\n"),
            4,
            &[
                "service \"mx\"",
                "algorithm \"fastest\"",
                "round_robin, weighted_round_robin, least_conn, ip_hash, least_time",
            ],
        ),
        rejected(
            "unknown_proxy_protocol_lists_valid_ones",
            service_with("proxy_protocol = \"v3\"\n"),
            4,
            &["proxy_protocol \"v3\"", "none, v1, v2"],
        ),
        rejected(
            "unknown_health_kind_lists_valid_ones",
            service_with("[service.health]\nkind = \"http\"\n"),
            5,
            &["health.kind \"http\"", "none, tcp, smtp"],
        ),
        rejected(
            "unknown_dataplane_lists_valid_ones",
            service_with("dataplane = \"dpdk\"\n"),
            4,
            &["dataplane \"dpdk\"", "proxy, xdp"],
        ),
        // -------------------------------------------------------------------------------
        // Names, duplicates, counts
        // The first service fills lines 1-11; the second's header is on 13, its name on 14.
        rejected(
            "duplicate_service_names_are_rejected",
            format!(
                "{}\n[[service]]\nname = \"mx\"\nlisten = \"127.0.0.1:@PORT2@\"\n{GOOD_BACKENDS}",
                service_with("")
            ),
            14,
            &["service \"mx\"", "duplicate service name", "line 2"],
        ),
        rejected(
            "duplicate_backend_names_are_rejected",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"127.0.0.1:2601\"\n\n[[service.backend]]\nname = \"mta1\"\naddress = \"127.0.0.1:2602\"\n"
            ),
            10,
            &["backend \"mta1\"", "duplicate backend name", "line 6"],
        ),
        rejected(
            "service_name_missing_is_rejected",
            format!("[[service]]\nlisten = \"127.0.0.1:@PORT1@\"\n{GOOD_BACKENDS}"),
            1,
            &["service #1", "name is missing"],
        ),
        rejected(
            "service_name_with_spaces_is_rejected",
            format!(
                "[[service]]\nname = \"my mx\"\nlisten = \"127.0.0.1:@PORT1@\"\n{GOOD_BACKENDS}"
            ),
            2,
            &["name \"my mx\"", "letters, digits"],
        ),
        rejected(
            "weight_zero_is_rejected",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta2\"\naddress = \"127.0.0.1:2602\"\nweight = 0\n"
            ),
            8,
            &["service \"mx\" backend \"mta2\": weight must be between 1 and 1000, got 0"],
        ),
        rejected(
            "weight_above_1000_is_rejected",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta2\"\naddress = \"127.0.0.1:2602\"\nweight = 1001\n"
            ),
            8,
            &[
                "backend \"mta2\"",
                "weight must be between 1 and 1000, got 1001",
            ],
        ),
        rejected(
            "negative_max_connections_is_rejected",
            service_with("max_connections = -5\n"),
            4,
            &["max_connections", "got -5"],
        ),
        rejected(
            "service_without_backends_is_rejected",
            GOOD_SERVICE,
            1,
            &["service \"mx\"", "no backends", "[[service.backend]]"],
        ),
        rejected("empty_file_has_no_services", "", 1, &["no [[service]]"]),
        rejected(
            "file_with_only_settings_has_no_services",
            "# nothing yet\nshutdown_timeout = \"5s\"\n",
            1,
            &["no [[service]]"],
        ),
        // -------------------------------------------------------------------------------
        // Listen conflicts
        rejected(
            "two_services_on_the_same_address_conflict",
            format!(
                "{}\n[[service]]\nname = \"submission\"\nlisten = \"127.0.0.1:@PORT1@\"\n{GOOD_BACKENDS}",
                service_with("")
            ),
            15,
            &[
                "service \"submission\"",
                "conflicts with",
                "service \"mx\"",
                "line 3",
            ],
        ),
        rejected(
            "wildcard_and_specific_address_on_one_port_conflict",
            format!(
                "{}\n[[service]]\nname = \"any\"\nlisten = \"0.0.0.0:@PORT1@\"\n{GOOD_BACKENDS}",
                service_with("")
            ),
            15,
            &[
                "service \"any\"",
                "listen 0.0.0.0:",
                "conflicts with 127.0.0.1:",
            ],
        ),
        rejected(
            "same_address_twice_in_one_service_is_rejected",
            format!(
                "[[service]]\nname = \"mx\"\nlisten = [\"127.0.0.1:@PORT1@\", \"127.0.0.1:@PORT1@\"]\n{GOOD_BACKENDS}"
            ),
            3,
            &["listen 127.0.0.1:", "twice"],
        ),
        // -------------------------------------------------------------------------------
        // Timeouts and health thresholds
        rejected(
            "zero_connect_timeout_is_rejected",
            service_with("connect_timeout = \"0s\"\n"),
            4,
            &["connect_timeout = \"0s\" is too short: it must be at least"],
        ),
        rejected(
            "zero_idle_timeout_is_rejected",
            service_with("idle_timeout = \"0ms\"\n"),
            4,
            &["idle_timeout = \"0ms\" is too short: it must be at least"],
        ),
        rejected(
            "zero_greeting_timeout_is_rejected",
            service_with("greeting_timeout = \"0s\"\n"),
            4,
            &["greeting_timeout = \"0s\" is too short: it must be at least"],
        ),
        rejected(
            "zero_shutdown_timeout_is_rejected",
            format!("shutdown_timeout = \"0s\"\n{}", service_with("")),
            1,
            &["shutdown_timeout = \"0s\" is too short: it must be at least"],
        ),
        rejected(
            "workers_out_of_range_are_rejected_0",
            format!("workers = 0\n{}", service_with("")),
            1,
            &["workers must be between 1 and 1024, got 0"],
        ),
        rejected(
            "workers_out_of_range_are_rejected_1025",
            format!("workers = 1025\n{}", service_with("")),
            1,
            &["workers must be between 1 and 1024, got 1025"],
        ),
        rejected(
            "workers_out_of_range_are_rejected_-2",
            format!("workers = -2\n{}", service_with("")),
            1,
            &["workers must be between 1 and 1024, got -2"],
        ),
        rejected(
            "workers_must_be_a_number",
            format!("workers = \"auto\"\n{}", service_with("")),
            1,
            &["workers", "invalid type"],
        ),
        rejected(
            "zero_health_interval_is_rejected",
            service_with("[service.health]\ninterval = \"0s\"\ntimeout = \"0s\"\n"),
            5,
            &["health.interval = \"0s\" is too short: it must be at least 100ms"],
        ),
        rejected(
            "absurdly_long_timeout_is_rejected",
            service_with("idle_timeout = \"30days\"\n"),
            4,
            &["idle_timeout = \"30days\" is too long: it must be at most 7d"],
        ),
        rejected(
            "nanosecond_health_interval_is_rejected",
            service_with("[service.health]\ninterval = \"1ns\"\ntimeout = \"1ns\"\n"),
            5,
            &["health.interval = \"1ns\" is too short: it must be at least 100ms"],
        ),
        rejected(
            "health_timeout_below_100ms_is_rejected",
            service_with("[service.health]\ninterval = \"1s\"\ntimeout = \"99ms\"\n"),
            6,
            &["health.timeout = \"99ms\" is too short: it must be at least 100ms"],
        ),
        rejected(
            "nanosecond_connect_timeout_is_rejected",
            service_with("connect_timeout = \"1ns\"\n"),
            4,
            &["connect_timeout = \"1ns\" is too short: it must be at least 100ms"],
        ),
        rejected(
            "millisecond_greeting_timeout_is_rejected",
            service_with("greeting_timeout = \"5ms\"\n"),
            4,
            &["greeting_timeout = \"5ms\" is too short: it must be at least 100ms"],
        ),
        rejected(
            "subsecond_idle_timeout_is_rejected",
            service_with("idle_timeout = \"500ms\"\n"),
            4,
            &["idle_timeout = \"500ms\" is too short: it must be at least 1s"],
        ),
        rejected(
            "microsecond_shutdown_timeout_is_rejected",
            format!("shutdown_timeout = \"10us\"\n{}", service_with("")),
            1,
            &["shutdown_timeout = \"10us\" is too short: it must be at least 100ms"],
        ),
        rejected(
            "xdp_subsecond_flow_idle_timeout_is_rejected",
            format!(
                "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\nflow_idle_timeout = \"1ms\"\n{GOOD_BACKENDS}"
            ),
            7,
            &["xdp.flow_idle_timeout = \"1ms\" is too short: it must be at least 1s"],
        ),
        accepted(
            "shortest_durations_are_accepted",
            format!(
                "shutdown_timeout = \"100ms\"\n{}",
                service_with(
                    "connect_timeout = \"100ms\"\ngreeting_timeout = \"100ms\"\nidle_timeout = \"1s\"\n[service.health]\ninterval = \"100ms\"\ntimeout = \"100ms\"\n"
                )
            ),
            &[
                "health smtp every 100ms (timeout 100ms",
                "shutdown_timeout 100ms",
            ],
        ),
        rejected(
            "rise_zero_is_rejected",
            service_with("[service.health]\nrise = 0\n"),
            5,
            &["health.rise must be between 1 and 100, got 0"],
        ),
        rejected(
            "fall_zero_is_rejected",
            service_with("[service.health]\nfall = 0\n"),
            5,
            &["health.fall must be between 1 and 100, got 0"],
        ),
        rejected(
            "health_timeout_above_interval_is_rejected",
            service_with("[service.health]\ninterval = \"1s\"\ntimeout = \"2s\"\n"),
            6,
            &["health.timeout (2s) must not exceed health.interval (1s)"],
        ),
        rejected(
            "ehlo_with_space_is_rejected",
            service_with("[service.health]\nehlo = \"lb one\"\n"),
            5,
            &["health.ehlo \"lb one\""],
        ),
        rejected(
            "negative_retries_is_rejected",
            service_with("retries = -1\n"),
            4,
            &["retries must be between 0 and 100, got -1"],
        ),
        // -------------------------------------------------------------------------------
        // The XDP data plane
        rejected(
            "xdp_without_table_is_rejected",
            format!(
                "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:@PORT1@\"\ndataplane = \"xdp\"\n{GOOD_BACKENDS}"
            ),
            4,
            &["service \"fast\"", "needs a [service.xdp] table"],
        ),
        rejected(
            "xdp_table_with_proxy_dataplane_is_rejected",
            service_with(XDP_TABLE),
            4,
            &[
                "service \"mx\"",
                "[service.xdp] is only allowed with dataplane = \"xdp\"",
            ],
        ),
        rejected(
            "xdp_with_least_time_is_rejected",
            xdp_service(
                "\"198.18.0.100:25\"",
                "algorithm = \"least_time\"\n",
                GOOD_BACKENDS,
            ),
            5,
            &["algorithm \"least_time\" is not available with dataplane = \"xdp\""],
        ),
        rejected(
            "xdp_with_wildcard_vip_is_rejected",
            xdp_service("\"0.0.0.0:@PORT1@\"", "", GOOD_BACKENDS),
            3,
            &["listen must be a concrete IP address", "0.0.0.0:"],
        ),
        rejected(
            "xdp_nat_with_ipv6_vip_and_ipv4_backends_is_rejected",
            xdp_service("\"[2001:db8::1]:25\"", "", &format!("{NAT}{GOOD_BACKENDS}")),
            11,
            &[
                "backend \"mta1\"",
                "address 127.0.0.1:2601 is IPv4 and the VIP [2001:db8::1]:25 is IPv6",
                "\"nat\" does not translate between IPv4 and IPv6",
            ],
        ),
        accepted(
            "xdp_nat_with_ipv6_vip_and_ipv6_backends_is_accepted",
            xdp_service(
                "\"[2001:2::100]:25\"",
                "",
                &format!(
                    "{NAT}\n[[service.backend]]\nname = \"a\"\naddress = \"[2001:2:1::11]:25\"\n\n[[service.backend]]\nname = \"b\"\naddress = \"[2001:2:1::12]:25\"\n"
                ),
            ),
            &["fast"],
        ),
        rejected(
            "xdp_nat_with_an_ipv4_and_an_ipv6_vip_is_rejected",
            xdp_service(
                "[\"198.18.0.100:25\", \"[2001:2::100]:25\"]",
                "",
                &format!("{NAT}{GOOD_BACKENDS}"),
            ),
            3,
            &["\"nat\" serves one VIP, IPv4 or IPv6"],
        ),
        accepted(
            "xdp_dsr_with_an_ipv4_and_an_ipv6_vip_and_ipv6_backends_is_accepted",
            xdp_service(
                "[\"198.18.0.100:25\", \"[2001:2::100]:25\"]",
                "",
                "\n[[service.backend]]\nname = \"a\"\naddress = \"[2001:2::11]:25\"\n\n[[service.backend]]\nname = \"b\"\naddress = \"198.18.0.12:25\"\n",
            ),
            &["fast"],
        ),
        rejected(
            "xdp_with_two_ipv6_vips_is_rejected",
            xdp_service(
                "[\"[2001:2::100]:25\", \"[2001:2::101]:25\"]",
                "",
                GOOD_BACKENDS,
            ),
            3,
            &["one IPv4 and one IPv6 VIP"],
        ),
        rejected(
            "xdp_with_two_listen_addresses_is_rejected",
            xdp_service(
                "[\"198.18.0.100:25\", \"198.18.0.101:25\"]",
                "",
                GOOD_BACKENDS,
            ),
            3,
            &["listen must be one VIP address:port, or one IPv4 and one IPv6 VIP"],
        ),
        rejected(
            "xdp_nat_with_ipv6_backend_is_rejected",
            xdp_service(
                "\"198.18.0.100:25\"",
                "",
                &format!(
                    "{NAT}\n[[service.backend]]\nname = \"v6\"\naddress = \"[2001:db8::2]:25\"\n"
                ),
            ),
            11,
            &[
                "backend \"v6\"",
                "address [2001:db8::2]:25 is IPv6 and the VIP 198.18.0.100:25 is IPv4",
                "\"nat\" does not translate between IPv4 and IPv6",
            ],
        ),
        rejected(
            "xdp_ipv6_backend_is_named_even_after_a_bad_one_1",
            xdp_service(
                "\"198.18.0.100:25\"",
                "",
                &format!("{NAT}{BAD_THEN_V6_BACKENDS}"),
            ),
            11,
            &["backend \"bad\"", "not an IP address"],
        ),
        rejected(
            "xdp_ipv6_backend_is_named_even_after_a_bad_one_2",
            xdp_service(
                "\"198.18.0.100:25\"",
                "",
                &format!("{NAT}{BAD_THEN_V6_BACKENDS}"),
            ),
            15,
            &["backend \"v6\"", "does not translate between IPv4 and IPv6"],
        ),
        rejected(
            "xdp_with_proxy_protocol_is_rejected",
            xdp_service(
                "\"198.18.0.100:25\"",
                "proxy_protocol = \"v2\"\n",
                GOOD_BACKENDS,
            ),
            5,
            &["proxy_protocol must be \"none\" with dataplane = \"xdp\""],
        ),
        rejected(
            "xdp_unknown_forwarding_lists_valid_ones",
            format!(
                "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\nforwarding = \"tunnel\"\n{GOOD_BACKENDS}"
            ),
            7,
            &["xdp.forwarding \"tunnel\"", "dsr, nat"],
        ),
        rejected(
            "xdp_interface_missing_or_bad_is_rejected_1",
            format!(
                "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\nforwarding = \"nat\"\n{GOOD_BACKENDS}"
            ),
            6,
            &["xdp.interface is missing"],
        ),
        rejected(
            "xdp_interface_missing_or_bad_is_rejected_2",
            format!(
                "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"a-very-long-interface-name\"\n{GOOD_BACKENDS}"
            ),
            6,
            &["xdp.interface", "not a network interface name"],
        ),
        rejected(
            "xdp_flow_table_size_out_of_range_is_rejected",
            format!(
                "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\nflow_table_size = 0\n{GOOD_BACKENDS}"
            ),
            7,
            &["xdp.flow_table_size must be between 1024 and 67108864, got 0"],
        ),
        rejected(
            "xdp_pin_of_wrong_type_is_named",
            format!(
                "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\npin = \"yes\"\n{GOOD_BACKENDS}"
            ),
            7,
            &["service.xdp.pin", "expected a boolean"],
        ),
        rejected(
            "xdp_services_must_agree_on_pin",
            format!(
                "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\n{GOOD_BACKENDS}\n{PINNED_SECOND_XDP_SERVICE}{GOOD_BACKENDS}"
            ),
            22,
            &[
                "service \"fast2\"",
                "xdp.pin = true differs from service \"fast\"",
            ],
        ),
        rejected(
            "xdp_unknown_mode_lists_valid_ones",
            format!(
                "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\nmode = \"driver\"\n{GOOD_BACKENDS}"
            ),
            7,
            &["xdp.mode \"driver\"", "auto, native, generic"],
        ),
        rejected(
            "xdp_services_must_agree_on_mode",
            format!(
                "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\n{GOOD_BACKENDS}\n[[service]]\nname = \"fast2\"\nlisten = \"198.18.0.101:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth1\"\nmode = \"generic\"\n{GOOD_BACKENDS}"
            ),
            22,
            &[
                "service \"fast2\"",
                "xdp.mode = \"generic\" differs from service \"fast\" (mode = \"auto\")",
            ],
        ),
        rejected(
            "backend_drain_of_wrong_type_is_named",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"127.0.0.1:2601\"\ndrain = 1\n"
            ),
            8,
            &["service.backend.drain", "expected a boolean"],
        ),
        // -------------------------------------------------------------------------------
        // Valid configs and their summaries
        accepted(
            "ipv4_and_ipv6_on_the_same_port_do_not_conflict",
            format!(
                "[[service]]\nname = \"a\"\nlisten = \"0.0.0.0:2525\"\n{GOOD_BACKENDS}\n[[service]]\nname = \"b\"\nlisten = \"[::1]:2525\"\n{GOOD_BACKENDS}"
            ),
            &["[::1]:2525"],
        ),
        // Capped at run time to the number of other backends; not an error.
        accepted(
            "retries_beyond_the_backend_count_is_accepted",
            service_with("retries = 10\n"),
            &[],
        ),
        accepted(
            "drained_backend_is_shown_in_the_summary",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"127.0.0.1:2601\"\ndrain = true\n\n[[service.backend]]\nname = \"mta2\"\naddress = \"127.0.0.1:2602\"\ndrain = false\n"
            ),
            &[
                "backend \"mta1\": 127.0.0.1:2601 weight 1 max_connections unlimited (drain: no new sessions)",
                "backend \"mta2\": 127.0.0.1:2602 weight 1 max_connections unlimited\n",
            ],
        ),
        accepted(
            "valid_xdp_service_is_accepted_with_defaults",
            format!(
                "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\nalgorithm = \"ip_hash\"\n[service.xdp]\ninterface = \"sy-lb0\"\nforwarding = \"nat\"\n{GOOD_BACKENDS}"
            ),
            &["dataplane xdp (nat on sy-lb0)", "algorithm ip_hash"],
        ),
        accepted(
            "minimal_config_gets_the_documented_defaults",
            format!(
                "[[service]]\nname = \"mx\"\nlisten = [\"127.0.0.1:2525\", \"[::1]:2525\"]\n{GOOD_BACKENDS}"
            ),
            &[
                "service \"mx\": listen 127.0.0.1:2525, [::1]:2525;",
                "algorithm least_conn",
                "dataplane proxy",
                "proxy_protocol none",
                "health smtp every 2s (timeout 1s, rise 2, fall 2)",
                "shutdown_timeout 30s",
                "workers auto",
                "backend \"mta1\": 127.0.0.1:2601 weight 1 max_connections unlimited",
                "backend \"mta2\": 127.0.0.1:2602 weight 1 max_connections unlimited",
            ],
        ),
        accepted(
            "full_config_is_summarised",
            "shutdown_timeout = \"1m\"\n\
             workers = 3\n\
             [[service]]\n\
             name = \"mx\"\n\
             listen = \"127.0.0.1:2525\"\n\
             algorithm = \"weighted_round_robin\"\n\
             proxy_protocol = \"v2\"\n\
             max_connections = 500\n\
             connect_timeout = \"500ms\"\n\
             greeting_timeout = \"8s\"\n\
             idle_timeout = \"5m\"\n\
             retries = 1\n\
             [service.health]\n\
             kind = \"tcp\"\n\
             interval = \"5s\"\n\
             timeout = \"5s\"\n\
             rise = 3\n\
             fall = 1\n\
             [[service.backend]]\n\
             name = \"big\"\n\
             address = \"[::1]:2601\"\n\
             weight = 1000\n\
             max_connections = 100\n",
            &[
                "algorithm weighted_round_robin",
                "proxy_protocol v2",
                "health tcp every 5s (timeout 5s, rise 3, fall 1)",
                "backend \"big\": [::1]:2601 weight 1000 max_connections 100",
                "shutdown_timeout 1m",
                "workers 3",
            ],
        ),
        // -------------------------------------------------------------------------------
        // [service.limits] and a backend's max_session_rate
        rejected(
            "limits_network_with_host_bits_is_rejected",
            service_with("[service.limits]\nallow = [\"192.0.2.1/24\"]\n"),
            5,
            &["limits.allow[0]", "host bits", "192.0.2.0/24"],
        ),
        rejected(
            "limits_network_that_is_no_network_is_rejected",
            service_with("[service.limits]\ndeny = [\"10.0.0.0/8\", \"nope\"]\n"),
            5,
            &["limits.deny[1]", "not an IP network"],
        ),
        rejected(
            "limits_prefix_longer_than_the_address_is_rejected",
            service_with("[service.limits]\ndeny = [\"10.0.0.0/33\"]\n"),
            5,
            &["limits.deny[0]", "prefix length", "0 to 32"],
        ),
        rejected(
            "limits_empty_allow_is_rejected",
            service_with("[service.limits]\nallow = []\n"),
            5,
            &["limits.allow is empty", "nobody"],
        ),
        rejected(
            "limits_source_prefix_out_of_range_is_rejected",
            service_with("[service.limits]\nsource_prefix_v4 = 4\n"),
            5,
            &["limits.source_prefix_v4", "between 8 and 32"],
        ),
        rejected(
            "unknown_limits_key_lists_the_keys",
            service_with("[service.limits]\nper_source_conections = 3\n"),
            5,
            &["per_source_conections", "per_source_connections"],
        ),
        rejected(
            "negative_max_session_rate_is_rejected",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"a\"\naddress = \"127.0.0.1:2601\"\nmax_session_rate = -1\n"
            ),
            8,
            &["max_session_rate", "between 0 and 1000000"],
        ),
        accepted(
            "limits_are_summarized",
            service_with(
                "[service.limits]\nper_source_connections = 5\nper_source_rate = 10\nallow = [\"127.0.0.0/8\"]\n",
            ),
            &[
                "limits: 5 sessions per source",
                "10/s per source (burst 20)",
                "allow 1 network(s) only",
            ],
        ),
        // -------------------------------------------------------------------------------
        // [announce], announce, announce_protocol
        accepted(
            "announce_with_a_derived_protocol_is_accepted",
            format!(
                "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\n{}",
                service_with("announce = true\n")
            ),
            &["announce: BIRD protocol vip_mx (through /run/bird/bird.ctl)"],
        ),
        accepted(
            "announce_protocol_named_is_accepted",
            format!(
                "[announce]\nbird_socket = \"bird.ctl\"\n{}",
                service_with("announce = true\nannounce_protocol = \"mail_vip4\"\n")
            ),
            &["announce: BIRD protocol mail_vip4 (through /etc/switchyard/bird.ctl)"],
        ),
        rejected(
            "announce_without_an_announce_table_is_rejected",
            service_with("announce = true\n"),
            4,
            &[
                "service \"mx\"",
                "announce = true needs an [announce] table",
                "bird_socket",
            ],
        ),
        rejected(
            "announce_table_without_bird_socket_is_rejected",
            format!("[announce]\n\n{}", service_with("announce = true\n")),
            1,
            &["[announce] needs bird_socket", "/run/bird/bird.ctl"],
        ),
        rejected(
            "announce_bird_socket_empty_is_rejected",
            format!("[announce]\nbird_socket = \"\"\n{}", service_with("")),
            2,
            &[
                "announce.bird_socket must not be empty",
                "remove the [announce] table",
            ],
        ),
        rejected(
            "announce_bird_socket_too_long_is_rejected",
            format!(
                "[announce]\nbird_socket = \"/{}\"\n{}",
                "b".repeat(120),
                service_with("")
            ),
            2,
            &["announce.bird_socket", "at most 107"],
        ),
        rejected(
            "announce_protocol_without_announce_is_rejected",
            format!(
                "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\n{}",
                service_with("announce_protocol = \"vip_mx\"\n")
            ),
            6,
            &["announce_protocol \"vip_mx\" is set but announce is not true"],
        ),
        rejected(
            "announce_protocol_not_a_bird_symbol_is_rejected",
            format!(
                "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\n{}",
                service_with("announce = true\nannounce_protocol = \"vip-mx\"\n")
            ),
            7,
            &[
                "announce_protocol \"vip-mx\" is not a BIRD protocol name",
                "letters, digits or '_'",
            ],
        ),
        rejected(
            "announce_protocol_shared_by_two_services_is_rejected",
            format!(
                "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\n{}\n[[service]]\nname = \"mx-b\"\nlisten = \"127.0.0.1:@PORT2@\"\nannounce = true\nannounce_protocol = \"vip_mx\"\n[[service.backend]]\nname = \"m\"\naddress = \"127.0.0.1:2701\"\n",
                service_with("announce = true\n")
            ),
            20,
            &[
                "service \"mx-b\"",
                "BIRD protocol \"vip_mx\" is already announced by service \"mx\" (line 6)",
            ],
        ),
        rejected(
            "announce_not_a_boolean_is_rejected",
            service_with("announce = \"yes\"\n"),
            4,
            &["announce"],
        ),
        // -------------------------------------------------------------------------------
        // [announce] peers, interface: the second chance between balancers
        accepted(
            "announce_peers_with_an_interface_are_accepted",
            format!(
                "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\npeers = [\"198.18.0.21\", \"198.18.0.22\", \"fd00::23\"]\ninterface = \"eth0\"\n{}",
                service_with("announce = true\n")
            ),
            &["second chance on eth0 between peers 198.18.0.21, 198.18.0.22, fd00::23"],
        ),
        rejected(
            "announce_peers_without_interface_is_rejected",
            format!(
                "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\npeers = [\"198.18.0.21\", \"198.18.0.22\"]\n{}",
                service_with("")
            ),
            3,
            &["announce.peers needs announce.interface"],
        ),
        rejected(
            "announce_interface_without_peers_is_rejected",
            format!(
                "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\ninterface = \"eth0\"\n{}",
                service_with("")
            ),
            3,
            &["announce.interface \"eth0\" is set but announce.peers is not"],
        ),
        rejected(
            "announce_peer_not_an_address_is_rejected",
            format!(
                "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\npeers = [\"198.18.0.21\", \"198.18.0.22:179\"]\ninterface = \"eth0\"\n{}",
                service_with("")
            ),
            3,
            &[
                "announce.peers entry \"198.18.0.22:179\" is not an IP address",
                "without a port",
            ],
        ),
        rejected(
            "announce_peer_listed_twice_is_rejected",
            format!(
                "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\npeers = [\"198.18.0.21\", \"198.18.0.21\"]\ninterface = \"eth0\"\n{}",
                service_with("")
            ),
            3,
            &["announce.peers lists 198.18.0.21 twice"],
        ),
        rejected(
            "announce_one_peer_is_rejected",
            format!(
                "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\npeers = [\"198.18.0.21\"]\ninterface = \"eth0\"\n{}",
                service_with("")
            ),
            3,
            &["announce.peers has 1 address(es); it needs at least 2"],
        ),
        rejected(
            "announce_interface_not_a_name_is_rejected",
            format!(
                "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\npeers = [\"198.18.0.21\", \"198.18.0.22\"]\ninterface = \"eth/0\"\n{}",
                service_with("")
            ),
            4,
            &["announce.interface \"eth/0\" is not a network interface name"],
        ),
        rejected(
            "announce_more_than_17_peers_are_rejected",
            format!(
                "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\npeers = [{}]\ninterface = \"eth0\"\n{}",
                (1..=18)
                    .map(|i| format!("\"198.18.0.{i}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
                service_with("")
            ),
            3,
            &["announce.peers has 18 addresses", "at most 17 balancers"],
        ),
        rejected(
            "announce_peer_port_zero_is_rejected",
            format!(
                "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\npeers = [\"198.18.0.21\", \"198.18.0.22\"]\ninterface = \"eth0\"\npeer_port = 0\n{}",
                service_with("")
            ),
            5,
            &["announce.peer_port must be between 1 and 65535, got 0"],
        ),
        rejected(
            "announce_peer_port_without_peers_is_rejected",
            format!(
                "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\npeer_port = 9100\n{}",
                service_with("")
            ),
            3,
            &["announce.peer_port 9100 is set but announce.peers is not"],
        ),
        rejected(
            "announce_peers_not_a_list_is_rejected",
            format!(
                "[announce]\nbird_socket = \"/run/bird/bird.ctl\"\npeers = \"198.18.0.21\"\ninterface = \"eth0\"\n{}",
                service_with("")
            ),
            3,
            &["peers"],
        ),
        // -------------------------------------------------------------------------------
        // [admin]
        rejected(
            "admin_socket_empty_is_rejected",
            format!("[admin]\nsocket = \"\"\n{}", service_with("")),
            2,
            &["admin.socket must not be empty", "leave the key out"],
        ),
        rejected(
            "admin_socket_with_nul_is_rejected",
            format!("[admin]\nsocket = \"a\\u0000b\"\n{}", service_with("")),
            2,
            &["admin.socket", "NUL"],
        ),
        rejected(
            "admin_socket_longer_than_a_unix_socket_path_is_rejected",
            format!(
                "[admin]\nsocket = \"{}/admin.sock\"\n{}",
                "d".repeat(100),
                service_with("")
            ),
            2,
            &["admin.socket", "at most 107", "/etc/switchyard/ddd"],
        ),
        rejected(
            "admin_socket_of_wrong_type_is_named",
            format!("[admin]\nsocket = 1\n{}", service_with("")),
            2,
            &["admin.socket", "integer"],
        ),
        rejected(
            "unknown_admin_key_lists_expected_keys",
            format!("[admin]\nsockets = \"a.sock\"\n{}", service_with("")),
            2,
            &["sockets", "socket"],
        ),
        rejected(
            "unknown_top_level_key_lists_admin",
            format!("admn = 1\n{}", service_with("")),
            1,
            &["admn", "admin"],
        ),
        accepted(
            "admin_socket_defaults_to_run_switchyard",
            service_with(""),
            &["admin socket /run/switchyard/admin.sock"],
        ),
        accepted(
            "relative_admin_socket_is_taken_from_the_config_directory",
            format!("[admin]\nsocket = \"run/admin.sock\"\n{}", service_with("")),
            &["admin socket /etc/switchyard/run/admin.sock"],
        ),
        accepted(
            "absolute_admin_socket_is_kept",
            format!(
                "[admin]\nsocket = \"/var/run/sy/ctl.sock\"\n{}",
                service_with("")
            ),
            &["admin socket /var/run/sy/ctl.sock"],
        ),
        // -------------------------------------------------------------------------------
        // The shipped examples
        accepted(
            "shipped_xdp_example_passes_check_once_uncommented",
            shipped_xdp_example(),
            &["dataplane xdp"],
        ),
        accepted(
            "shipped_demo_toml_passes_check",
            read_shipped("demo.toml"),
            &[
                "listen 127.0.0.1:2525;",
                "algorithm least_conn",
                "health smtp every 1s (timeout 1s, rise 2, fall 2)",
                "127.0.0.1:2601",
                "127.0.0.1:2602",
                "127.0.0.1:2603",
            ],
        ),
    ]
}

/// `text` with `@PORT1@`, `@PORT2@`, ... replaced by `port(n)`; also returns the ports used.
fn fill_ports(text: &str, mut port: impl FnMut(u16) -> u16) -> (String, Vec<u16>) {
    let mut text = text.to_owned();
    let mut ports = Vec::new();
    for n in 1..=4 {
        let placeholder = format!("@PORT{n}@");
        if text.contains(&placeholder) {
            let port = port(n);
            text = text.replace(&placeholder, &port.to_string());
            ports.push(port);
        }
    }
    (text, ports)
}

/// Whether an error line names `file:line:` and every fragment.
fn names_location_and_fragments(error: &str, location: &str, fragments: &[&str]) -> bool {
    error.contains(location) && fragments.iter().all(|f| error.contains(f))
}

/// What is wrong with the outcome of `case` parsed in process, if anything.
fn in_process_failure(case: &Case) -> Option<String> {
    // Nothing binds in process, so fixed ports do.
    let (text, _) = fill_ports(&case.toml, |n| 25000 + n);
    match (&case.expect, config::parse(Path::new(TABLE_FILE), &text)) {
        (Expect::Error(line, fragments), Err(errors)) => {
            let location = format!("{TABLE_FILE}:{line}:");
            let found = errors
                .errors
                .iter()
                .any(|e| names_location_and_fragments(e, &location, fragments));
            (!found)
                .then(|| format!("no error with {location:?} and {fragments:?}; got:\n{errors}"))
        }
        (Expect::Error(..), Ok(config)) => Some(format!(
            "accepted, but must be rejected; summary:\n{}",
            config.summary()
        )),
        (Expect::Summary(fragments), Ok(config)) => {
            let summary = config.summary();
            let missing: Vec<&&str> = fragments
                .iter()
                .filter(|f| !summary.contains(**f))
                .collect();
            (!summary.ends_with("configuration OK\n") || !missing.is_empty())
                .then(|| format!("summary lacks {missing:?} or its final line:\n{summary}"))
        }
        (Expect::Summary(_), Err(errors)) => {
            Some(format!("rejected, but must be accepted:\n{errors}"))
        }
    }
}

#[test]
fn every_case_in_the_table() {
    let cases = table();
    let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "case names must be unique");
    // Every failure, not just the first, so one bad case never hides another.
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            in_process_failure(case)
                .map(|failure| format!("case {}: {failure}\nconfig:\n{}", case.name, case.toml))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn directory_instead_of_file_is_an_error() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let errors = config::load(dir.path())
        .expect_err("a directory is not a config file")
        .to_string();
    assert!(
        errors.contains(&dir.path().display().to_string()),
        "{errors}"
    );
    assert!(errors.contains("cannot read"), "{errors}");
}

/// A 200 kB value in each place a value is quoted: every message names the key and shows the
/// value once, cut.
#[test]
fn long_values_are_cut_and_shown_once() {
    let long = "x".repeat(200_000);
    let cases = [
        (
            "service name",
            format!("[[service]]\nname = \"{long}\"\nlisten = \"127.0.0.1:2525\"\n{GOOD_BACKENDS}"),
            "name",
        ),
        (
            "backend name",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"{long}\"\naddress = \"127.0.0.1:2601\"\n"
            ),
            "name",
        ),
        (
            "algorithm",
            service_with(&format!("algorithm = \"{long}\"\n")),
            "algorithm",
        ),
        (
            "duration",
            service_with(&format!("idle_timeout = \"{long}\"\n")),
            "idle_timeout",
        ),
        (
            "listen",
            format!("[[service]]\nname = \"mx\"\nlisten = \"{long}:25\"\n{GOOD_BACKENDS}"),
            "listen",
        ),
        (
            "listen port",
            format!("[[service]]\nname = \"mx\"\nlisten = \"127.0.0.1:{long}\"\n{GOOD_BACKENDS}"),
            "listen",
        ),
        (
            "address",
            format!("{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"{long}\"\n"),
            "address",
        ),
        (
            "ehlo",
            service_with(&format!("[service.health]\nehlo = \"{long}\"\n")),
            "health.ehlo",
        ),
        (
            "wrong type",
            format!(
                "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"127.0.0.1:2601\"\nweight = \"{long}\"\n"
            ),
            "weight",
        ),
        (
            "unknown key",
            service_with(&format!("{long} = 1\n")),
            "unknown field",
        ),
    ];
    for (what, text, key) in cases {
        let text = text.replace("@PORT1@", "2525");
        let errors = config::parse(Path::new(TABLE_FILE), &text)
            .expect_err(what)
            .errors;
        for error in &errors {
            assert!(
                error.len() < 600 && error.contains('…') && error.contains(key),
                "{what}: a message that is long, uncut or without its key {key:?}: {}",
                &error[..error.len().min(600)]
            );
            assert_eq!(
                error.matches(&"x".repeat(40)).count(),
                1,
                "{what}: value shown more than once: {error}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Through the binary: exit codes, what reaches stdout and stderr, and that `run` refuses a
// bad config without listening.

/// A config file in its own temporary directory, with the loopback ports it mentions.
struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
    ports: Vec<u16>,
}

/// Writes `text` to a file, its `@PORTn@` placeholders replaced with free loopback ports.
fn write_config(text: &str) -> ConfigFile {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (text, ports) = fill_ports(text, |_| free_addr().port());
    let path = dir.path().join("switchyard.toml");
    std::fs::write(&path, text).expect("write config");
    ConfigFile {
        _dir: dir,
        path,
        ports,
    }
}

fn switchyard(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("start switchyard")
}

fn check(path: &Path) -> Output {
    switchyard(&["check", "--config", path.to_str().expect("utf-8 path")])
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Starts `switchyard run`, and until it exits keeps trying to connect to `ports`; returns
/// its output and whether any connection was ever accepted. Gives up after 10 s.
fn run_watching_ports(path: &Path, ports: &[u16]) -> (Output, bool) {
    let mut child = Command::new(BIN)
        .args(["run", "--config", path.to_str().expect("utf-8 path")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start switchyard run");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut accepted = false;
    loop {
        if child.try_wait().expect("poll child").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("collect output");
            panic!(
                "switchyard run did not exit within 10 s on a bad config; stderr:\n{}",
                text(&output.stderr)
            );
        }
        for &port in ports {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            if TcpStream::connect_timeout(&addr, Duration::from_millis(50)).is_ok() {
                accepted = true;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let output = child.wait_with_output().expect("collect output");
    (output, accepted)
}

/// The table's case `name` through the binary: `check` and `run` both exit 1 with its error
/// at `path:line:` mentioning every fragment, `check` prints no summary, and `run` never
/// listens.
fn assert_rejected_by_the_binary(name: &str) {
    let case = table()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name:?} in the table"));
    let Expect::Error(line, needles) = case.expect else {
        panic!("case {name:?} is not a rejected config");
    };
    let file = write_config(&case.toml);
    let location = format!("{}:{line}:", file.path.display());

    let out = check(&file.path);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "check should exit 1; stderr:\n{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| names_location_and_fragments(l, &location, needles)),
        "check: no error line with {location:?} and {needles:?}; stderr:\n{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "check printed a summary for a bad config: {}",
        text(&out.stdout)
    );

    let (out, accepted) = run_watching_ports(&file.path, &file.ports);
    let run_stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "run should exit 1; stderr:\n{run_stderr}"
    );
    assert!(
        run_stderr
            .lines()
            .any(|l| names_location_and_fragments(l, &location, needles)),
        "run: no error line with {location:?} and {needles:?}; stderr:\n{run_stderr}"
    );
    assert!(
        !accepted,
        "run accepted a connection although its config is invalid"
    );
    for &port in &file.ports {
        TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .unwrap_or_else(|e| panic!("port {port} is not free after a rejected run: {e}"));
    }
}

#[test]
fn binary_refuses_a_toml_syntax_error() {
    assert_rejected_by_the_binary("toml_syntax_error_has_line_and_column");
}

#[test]
fn binary_refuses_an_unknown_key() {
    assert_rejected_by_the_binary("unknown_service_key_lists_expected_keys");
}

/// The first service alone is valid: `run` must not start it while the second is wrong.
#[test]
fn binary_refuses_a_listen_conflict_without_listening() {
    assert_rejected_by_the_binary("two_services_on_the_same_address_conflict");
}

/// `command`'s output, or a panic naming `what` if it has not exited within 10 s. Its address
/// space is capped at 2 GiB, so a reader that never stops fails instead of filling memory.
fn output_within(what: &str, args: &[&str]) -> Output {
    let child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 2097152 && exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start switchyard");
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    match finished.recv_timeout(Duration::from_secs(10)) {
        Ok(output) => output.expect("collect output"),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("{what}: switchyard did not exit within 10 s");
        }
    }
}

/// `check --config path` exits 1 at once with an error naming the path and `reason`.
fn assert_check_refuses_the_file(path: &Path, reason: &str) {
    let shown = path.display().to_string();
    let out = output_within(&shown, &["check", "--config", &shown]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{shown}: cannot read the configuration: "))
            && stderr.contains(reason),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}

#[test]
fn fifo_as_config_is_refused_at_once() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let fifo = dir.path().join("switchyard.toml");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");
    assert_check_refuses_the_file(&fifo, "FIFO");
}

#[test]
fn device_as_config_is_refused_at_once() {
    assert_check_refuses_the_file(Path::new("/dev/zero"), "not a regular file");
}

#[test]
fn config_larger_than_16_mib_is_refused() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("switchyard.toml");
    // A valid config padded with comments to just over the limit.
    let mut text = read_shipped("demo.toml");
    let comment = format!("#{}\n", "-".repeat(1023));
    while text.len() <= 16 << 20 {
        text.push_str(&comment);
    }
    std::fs::write(&path, text).expect("write config");
    assert_check_refuses_the_file(&path, "larger than 16 MiB");
}

/// A listen address that is taken: `run` exits 1 naming file, line, key and address.
#[test]
fn listen_address_in_use_names_file_line_and_key() {
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a port");
    let port = taken.local_addr().expect("local address").port();
    let file = write_config(&format!(
        "[[service]]\nname = \"mx\"\nlisten = [\"127.0.0.1:@PORT1@\",\n  \"127.0.0.1:{port}\"]\n{GOOD_BACKENDS}"
    ));
    let path = file.path.display().to_string();
    let out = output_within("run", &["run", "--config", &path]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let expected = format!("{path}:4: service \"mx\": listen 127.0.0.1:{port}: cannot listen");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(&expected) && l.contains("in use")),
        "no line with {expected:?}; stderr:\n{stderr}"
    );
}

#[test]
fn missing_file_is_named_with_the_os_error() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("nope.toml");
    let out = check(&path);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("No such file or directory"), "{stderr}");

    let (out, _) = run_watching_ports(&path, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("No such file or directory"));
}

#[test]
fn every_problem_is_reported_in_one_run() {
    let config = "[[service]]\n\
                  name = \"mx\"\n\
                  listen = \"127.0.0.1:@PORT1@\"\n\
                  algorithm = \"fastest\"\n\
                  [service.health]\n\
                  rise = 0\n\
                  [[service.backend]]\n\
                  name = \"mta1\"\n\
                  address = \"localhost:25\"\n\
                  weight = 0\n";
    let file = write_config(config);
    let out = check(&file.path);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let path = file.path.display().to_string();
    for (line, key) in [
        (4, "algorithm"),
        (6, "health.rise"),
        (9, "address"),
        (10, "weight"),
    ] {
        let location = format!("{path}:{line}:");
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&location) && l.contains(key)),
            "missing {key} at line {line}:\n{stderr}"
        );
    }
    // In line order.
    let lines: Vec<usize> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("error: {path}:")))
        .filter_map(|rest| rest.split(':').next()?.parse().ok())
        .collect();
    assert_eq!(lines, vec![4, 6, 9, 10], "{stderr}");
}

#[test]
fn shipped_switchyard_toml_passes_check_and_stays_on_loopback() {
    let out = check(&shipped("switchyard.toml"));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains("listen 127.0.0.1:2525, [::1]:2525"),
        "{stdout}"
    );
    for port in [2601, 2602, 2603] {
        assert!(stdout.contains(&format!("127.0.0.1:{port}")), "{stdout}");
    }
    assert!(stdout.ends_with("configuration OK\n"), "{stdout}");
    // Safe as shipped: every address it would use is loopback.
    for line in stdout
        .lines()
        .filter(|l| l.contains("listen") || l.contains("backend"))
    {
        for word in line.split([' ', ',', ';']) {
            if let Ok(addr) = word.parse::<SocketAddr>() {
                assert!(
                    addr.ip().is_loopback(),
                    "non-loopback address {addr} in {line}"
                );
            }
        }
    }
}

#[test]
fn help_and_version_work_everywhere() {
    let version = switchyard(&["--version"]);
    assert_eq!(version.status.code(), Some(0));
    assert!(
        text(&version.stdout).contains(env!("CARGO_PKG_VERSION")),
        "{}",
        text(&version.stdout)
    );

    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["check", "--help"],
        &["help", "check"],
    ] {
        let out = switchyard(args);
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(stdout.contains("Usage:"), "{args:?}: {stdout}");
    }
    assert!(text(&switchyard(&["check", "--help"]).stdout).contains("--config"));
    assert!(text(&switchyard(&["run", "--help"]).stdout).contains("--config"));
}

#[test]
fn missing_config_argument_is_a_usage_error() {
    let out = switchyard(&["check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--config"));
}
