//! The configuration as an operator meets it: the real `switchyard` binary given config files
//! on disk. Every bad config must make `check` and `run` exit 1 with an error that names the
//! file, the line and the key, and `run` must not listen; good configs (including the shipped
//! examples) must pass `check` and print the summary.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// A config file in its own temporary directory, with the loopback ports it mentions.
struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
    ports: Vec<u16>,
}

/// A port nobody listens on right now (the kernel picks it; we let it go again).
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Writes `text` to a file, replacing `@PORT1@`, `@PORT2@`, ... with free loopback ports.
fn write_config(text: &str) -> ConfigFile {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut text = text.to_owned();
    let mut ports = Vec::new();
    for n in 1..=4 {
        let placeholder = format!("@PORT{n}@");
        if text.contains(&placeholder) {
            let port = free_port();
            text = text.replace(&placeholder, &port.to_string());
            ports.push(port);
        }
    }
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

/// `check` and `run` both exit 1 with an error at `path:line:` mentioning every `needle`,
/// and `run` never listens.
fn assert_rejected(config: &str, line: usize, needles: &[&str]) {
    let file = write_config(config);
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
            .any(|l| l.contains(&location) && needles.iter().all(|n| l.contains(n))),
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
            .any(|l| l.contains(&location) && needles.iter().all(|n| l.contains(n))),
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

/// `check` exits 0 and prints the summary; returns stdout.
fn assert_accepted(config: &str) -> String {
    let file = write_config(config);
    let out = check(&file.path);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "check should accept:\n{config}\nstderr:\n{}",
        text(&out.stderr)
    );
    assert!(stdout.ends_with("configuration OK\n"), "summary:\n{stdout}");
    stdout
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

// ---------------------------------------------------------------------------------------
// Files that cannot be read or parsed

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
fn directory_instead_of_file_is_an_error() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let out = check(dir.path());
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&dir.path().display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("cannot read"), "{stderr}");
}

#[test]
fn toml_syntax_error_has_line_and_column() {
    // The unterminated string starts on line 2, column 8.
    assert_rejected(
        "[[service]]\nname = \"mx\nlisten = \"127.0.0.1:@PORT1@\"\n",
        2,
        &["2:", "string"],
    );
}

#[test]
fn duplicate_key_is_a_syntax_error() {
    assert_rejected(
        &service_with("algorithm = \"ip_hash\"\nalgorithm = \"least_conn\"\n"),
        5,
        &["duplicate key"],
    );
}

#[test]
fn single_bracket_service_table_explains_the_array_form() {
    assert_rejected(
        "[service]\nname = \"mx\"\nlisten = \"127.0.0.1:@PORT1@\"\n",
        1,
        &["service", "[[service]]"],
    );
}

// ---------------------------------------------------------------------------------------
// Unknown keys and wrong types (serde reports the first one)

#[test]
fn unknown_top_level_key_lists_expected_keys() {
    assert_rejected(
        &format!("shutdown_timout = \"5s\"\n{}", service_with("")),
        1,
        &["shutdown_timout", "shutdown_timeout", "service"],
    );
}

#[test]
fn unknown_service_key_lists_expected_keys() {
    assert_rejected(
        &service_with("algorithmm = \"least_conn\"\n"),
        4,
        &["algorithmm", "algorithm", "proxy_protocol", "backend"],
    );
}

#[test]
fn unknown_health_key_lists_expected_keys() {
    assert_rejected(
        &service_with("[service.health]\nkind = \"smtp\"\nhelo = \"x.example\"\n"),
        6,
        &["service.health", "helo", "ehlo", "interval"],
    );
}

#[test]
fn unknown_backend_key_lists_expected_keys() {
    assert_rejected(
        &format!(
            "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"127.0.0.1:2601\"\nwieght = 3\n"
        ),
        8,
        &["service.backend", "wieght", "weight", "max_connections"],
    );
}

#[test]
fn unknown_xdp_key_lists_expected_keys() {
    assert_rejected(
        &format!(
            "{GOOD_SERVICE}dataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\nmode = \"dsr\"\n{GOOD_BACKENDS}"
        ),
        7,
        &["service.xdp", "mode", "forwarding", "flow_table_size"],
    );
}

#[test]
fn weight_of_wrong_type_is_named() {
    assert_rejected(
        &format!(
            "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"127.0.0.1:2601\"\nweight = \"3\"\n"
        ),
        8,
        &["service.backend.weight", "string"],
    );
}

#[test]
fn listen_of_wrong_type_is_named() {
    assert_rejected(
        &format!("[[service]]\nname = \"mx\"\nlisten = 25\n{GOOD_BACKENDS}"),
        3,
        &["service.listen", "address"],
    );
}

#[test]
fn duration_without_unit_asks_for_one() {
    assert_rejected(
        &service_with("connect_timeout = 3\n"),
        4,
        &["connect_timeout", "unit", "\"3s\""],
    );
}

#[test]
fn duration_that_does_not_parse_is_named() {
    assert_rejected(
        &service_with("idle_timeout = \"10 parsecs\"\n"),
        4,
        &["idle_timeout", "10 parsecs"],
    );
}

// ---------------------------------------------------------------------------------------
// Addresses

#[test]
fn listen_host_name_is_rejected_with_the_form_to_use() {
    assert_rejected(
        &format!("[[service]]\nname = \"mx\"\nlisten = \"mail.example.com:25\"\n{GOOD_BACKENDS}"),
        3,
        &[
            "listen",
            "mail.example.com:25",
            "not an IP address",
            "192.0.2.10:25",
        ],
    );
}

#[test]
fn listen_without_port_is_rejected() {
    assert_rejected(
        &format!("[[service]]\nname = \"mx\"\nlisten = \"127.0.0.1\"\n{GOOD_BACKENDS}"),
        3,
        &["listen", "no port", "127.0.0.1:25"],
    );
}

#[test]
fn listen_ipv6_without_brackets_is_rejected() {
    assert_rejected(
        &format!(
            "[[service]]\nname = \"mx\"\nlisten = [\"127.0.0.1:@PORT1@\",\n  \"2001:db8::1:x25\"]\n{GOOD_BACKENDS}"
        ),
        4,
        &["listen", "brackets", "[2001:db8::1]:25"],
    );
}

#[test]
fn listen_port_out_of_range_is_rejected() {
    assert_rejected(
        &format!("[[service]]\nname = \"mx\"\nlisten = \"127.0.0.1:70000\"\n{GOOD_BACKENDS}"),
        3,
        &["listen", "70000", "1 and 65535"],
    );
}

#[test]
fn listen_missing_is_rejected() {
    assert_rejected(
        &format!("[[service]]\nname = \"mx\"\n{GOOD_BACKENDS}"),
        1,
        &["service \"mx\"", "listen is missing"],
    );
}

#[test]
fn backend_host_name_is_rejected() {
    assert_rejected(
        &format!(
            "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"mta1.example.net:25\"\n"
        ),
        7,
        &[
            "service \"mx\" backend \"mta1\"",
            "address",
            "mta1.example.net:25",
            "not an IP address",
        ],
    );
}

#[test]
fn backend_wildcard_address_is_rejected() {
    assert_rejected(
        &format!(
            "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"0.0.0.0:25\"\n"
        ),
        7,
        &["backend \"mta1\"", "address", "wildcard"],
    );
}

#[test]
fn backend_address_missing_is_rejected() {
    assert_rejected(
        &format!("{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\n"),
        5,
        &["backend \"mta1\"", "address is missing"],
    );
}

// ---------------------------------------------------------------------------------------
// Unknown names for enumerated keys list the valid ones

#[test]
fn unknown_algorithm_lists_valid_ones() {
    assert_rejected(
        &service_with("algorithm = \"fastest\"\n"),
        4,
        &[
            "service \"mx\"",
            "algorithm \"fastest\"",
            "round_robin, weighted_round_robin, least_conn, ip_hash, least_time",
        ],
    );
}

#[test]
fn unknown_proxy_protocol_lists_valid_ones() {
    assert_rejected(
        &service_with("proxy_protocol = \"v3\"\n"),
        4,
        &["proxy_protocol \"v3\"", "none, v1, v2"],
    );
}

#[test]
fn unknown_health_kind_lists_valid_ones() {
    assert_rejected(
        &service_with("[service.health]\nkind = \"http\"\n"),
        5,
        &["health.kind \"http\"", "none, tcp, smtp"],
    );
}

#[test]
fn unknown_dataplane_lists_valid_ones() {
    assert_rejected(
        &service_with("dataplane = \"dpdk\"\n"),
        4,
        &["dataplane \"dpdk\"", "proxy, xdp"],
    );
}

// ---------------------------------------------------------------------------------------
// Names, duplicates, counts

#[test]
fn duplicate_service_names_are_rejected() {
    let config = format!(
        "{}\n[[service]]\nname = \"mx\"\nlisten = \"127.0.0.1:@PORT2@\"\n{GOOD_BACKENDS}",
        service_with("")
    );
    // The first service fills lines 1-11; the second's header is on 13, its name on 14.
    assert_rejected(
        &config,
        14,
        &["service \"mx\"", "duplicate service name", "line 2"],
    );
}

#[test]
fn duplicate_backend_names_are_rejected() {
    let config = format!(
        "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"127.0.0.1:2601\"\n\n[[service.backend]]\nname = \"mta1\"\naddress = \"127.0.0.1:2602\"\n"
    );
    assert_rejected(
        &config,
        10,
        &["backend \"mta1\"", "duplicate backend name", "line 6"],
    );
}

#[test]
fn service_name_missing_is_rejected() {
    assert_rejected(
        &format!("[[service]]\nlisten = \"127.0.0.1:@PORT1@\"\n{GOOD_BACKENDS}"),
        1,
        &["service #1", "name is missing"],
    );
}

#[test]
fn service_name_with_spaces_is_rejected() {
    assert_rejected(
        &format!("[[service]]\nname = \"my mx\"\nlisten = \"127.0.0.1:@PORT1@\"\n{GOOD_BACKENDS}"),
        2,
        &["name \"my mx\"", "letters, digits"],
    );
}

#[test]
fn weight_zero_is_rejected() {
    let config = format!(
        "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta2\"\naddress = \"127.0.0.1:2602\"\nweight = 0\n"
    );
    assert_rejected(
        &config,
        8,
        &["service \"mx\" backend \"mta2\": weight must be between 1 and 1000, got 0"],
    );
}

#[test]
fn weight_above_1000_is_rejected() {
    let config = format!(
        "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta2\"\naddress = \"127.0.0.1:2602\"\nweight = 1001\n"
    );
    assert_rejected(
        &config,
        8,
        &[
            "backend \"mta2\"",
            "weight must be between 1 and 1000, got 1001",
        ],
    );
}

#[test]
fn negative_max_connections_is_rejected() {
    assert_rejected(
        &service_with("max_connections = -5\n"),
        4,
        &["max_connections", "got -5"],
    );
}

#[test]
fn service_without_backends_is_rejected() {
    assert_rejected(
        GOOD_SERVICE,
        1,
        &["service \"mx\"", "no backends", "[[service.backend]]"],
    );
}

#[test]
fn empty_file_has_no_services() {
    assert_rejected("", 1, &["no [[service]]"]);
}

#[test]
fn file_with_only_settings_has_no_services() {
    assert_rejected(
        "# nothing yet\nshutdown_timeout = \"5s\"\n",
        1,
        &["no [[service]]"],
    );
}

// ---------------------------------------------------------------------------------------
// Listen conflicts

#[test]
fn two_services_on_the_same_address_conflict() {
    let config = format!(
        "{}\n[[service]]\nname = \"submission\"\nlisten = \"127.0.0.1:@PORT1@\"\n{GOOD_BACKENDS}",
        service_with("")
    );
    assert_rejected(
        &config,
        15,
        &[
            "service \"submission\"",
            "conflicts with",
            "service \"mx\"",
            "line 3",
        ],
    );
}

#[test]
fn wildcard_and_specific_address_on_one_port_conflict() {
    let config = format!(
        "{}\n[[service]]\nname = \"any\"\nlisten = \"0.0.0.0:@PORT1@\"\n{GOOD_BACKENDS}",
        service_with("")
    );
    assert_rejected(
        &config,
        15,
        &[
            "service \"any\"",
            "listen 0.0.0.0:",
            "conflicts with 127.0.0.1:",
        ],
    );
}

#[test]
fn same_address_twice_in_one_service_is_rejected() {
    assert_rejected(
        &format!(
            "[[service]]\nname = \"mx\"\nlisten = [\"127.0.0.1:@PORT1@\", \"127.0.0.1:@PORT1@\"]\n{GOOD_BACKENDS}"
        ),
        3,
        &["listen 127.0.0.1:", "twice"],
    );
}

#[test]
fn ipv4_and_ipv6_on_the_same_port_do_not_conflict() {
    let port = free_port();
    let out = assert_accepted(&format!(
        "[[service]]\nname = \"a\"\nlisten = \"0.0.0.0:{port}\"\n{GOOD_BACKENDS}\n[[service]]\nname = \"b\"\nlisten = \"[::1]:{port}\"\n{GOOD_BACKENDS}"
    ));
    assert!(out.contains(&format!("[::1]:{port}")), "{out}");
}

// ---------------------------------------------------------------------------------------
// Timeouts and health thresholds

#[test]
fn zero_connect_timeout_is_rejected() {
    assert_rejected(
        &service_with("connect_timeout = \"0s\"\n"),
        4,
        &["connect_timeout must be greater than zero"],
    );
}

#[test]
fn zero_idle_timeout_is_rejected() {
    assert_rejected(
        &service_with("idle_timeout = \"0ms\"\n"),
        4,
        &["idle_timeout must be greater than zero"],
    );
}

#[test]
fn zero_greeting_timeout_is_rejected() {
    assert_rejected(
        &service_with("greeting_timeout = \"0s\"\n"),
        4,
        &["greeting_timeout must be greater than zero"],
    );
}

#[test]
fn zero_shutdown_timeout_is_rejected() {
    assert_rejected(
        &format!("shutdown_timeout = \"0s\"\n{}", service_with("")),
        1,
        &["shutdown_timeout must be greater than zero"],
    );
}

#[test]
fn workers_out_of_range_are_rejected() {
    for bad in ["0", "1025", "-2"] {
        assert_rejected(
            &format!("workers = {bad}\n{}", service_with("")),
            1,
            &[&format!("workers must be between 1 and 1024, got {bad}")],
        );
    }
}

#[test]
fn workers_must_be_a_number() {
    assert_rejected(
        &format!("workers = \"auto\"\n{}", service_with("")),
        1,
        &["workers", "invalid type"],
    );
}

#[test]
fn zero_health_interval_is_rejected() {
    assert_rejected(
        &service_with("[service.health]\ninterval = \"0s\"\ntimeout = \"0s\"\n"),
        5,
        &["health.interval must be greater than zero"],
    );
}

#[test]
fn absurdly_long_timeout_is_rejected() {
    assert_rejected(
        &service_with("idle_timeout = \"30days\"\n"),
        4,
        &["idle_timeout must be at most 7d"],
    );
}

#[test]
fn rise_zero_is_rejected() {
    assert_rejected(
        &service_with("[service.health]\nrise = 0\n"),
        5,
        &["health.rise must be between 1 and 100, got 0"],
    );
}

#[test]
fn fall_zero_is_rejected() {
    assert_rejected(
        &service_with("[service.health]\nfall = 0\n"),
        5,
        &["health.fall must be between 1 and 100, got 0"],
    );
}

#[test]
fn health_timeout_above_interval_is_rejected() {
    assert_rejected(
        &service_with("[service.health]\ninterval = \"1s\"\ntimeout = \"2s\"\n"),
        6,
        &["health.timeout (2s) must not exceed health.interval (1s)"],
    );
}

#[test]
fn ehlo_with_space_is_rejected() {
    assert_rejected(
        &service_with("[service.health]\nehlo = \"lb one\"\n"),
        5,
        &["health.ehlo \"lb one\""],
    );
}

#[test]
fn negative_retries_is_rejected() {
    assert_rejected(
        &service_with("retries = -1\n"),
        4,
        &["retries must be between 0 and 100, got -1"],
    );
}

#[test]
fn retries_beyond_the_backend_count_is_accepted() {
    // Capped at run time to the number of other backends; not an error.
    assert_accepted(&service_with("retries = 10\n"));
}

// ---------------------------------------------------------------------------------------
// The XDP data plane

const XDP_TABLE: &str = "[service.xdp]\ninterface = \"eth0\"\n";

fn xdp_service(listen: &str, extra: &str, backends: &str) -> String {
    format!(
        "[[service]]\nname = \"fast\"\nlisten = {listen}\ndataplane = \"xdp\"\n{extra}{XDP_TABLE}{backends}"
    )
}

#[test]
fn xdp_without_table_is_rejected() {
    assert_rejected(
        &format!(
            "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:@PORT1@\"\ndataplane = \"xdp\"\n{GOOD_BACKENDS}"
        ),
        4,
        &["service \"fast\"", "needs a [service.xdp] table"],
    );
}

#[test]
fn xdp_table_with_proxy_dataplane_is_rejected() {
    assert_rejected(
        &service_with(XDP_TABLE),
        4,
        &[
            "service \"mx\"",
            "[service.xdp] is only allowed with dataplane = \"xdp\"",
        ],
    );
}

#[test]
fn xdp_with_least_time_is_rejected() {
    assert_rejected(
        &xdp_service(
            "\"198.18.0.100:25\"",
            "algorithm = \"least_time\"\n",
            GOOD_BACKENDS,
        ),
        5,
        &["algorithm \"least_time\" is not available with dataplane = \"xdp\""],
    );
}

#[test]
fn xdp_with_wildcard_vip_is_rejected() {
    assert_rejected(
        &xdp_service("\"0.0.0.0:@PORT1@\"", "", GOOD_BACKENDS),
        3,
        &["listen must be a concrete IPv4 address", "0.0.0.0:"],
    );
}

#[test]
fn xdp_with_ipv6_vip_is_rejected() {
    assert_rejected(
        &xdp_service("\"[2001:db8::1]:25\"", "", GOOD_BACKENDS),
        3,
        &["concrete IPv4 address"],
    );
}

#[test]
fn xdp_with_two_listen_addresses_is_rejected() {
    assert_rejected(
        &xdp_service(
            "[\"198.18.0.100:25\", \"198.18.0.101:25\"]",
            "",
            GOOD_BACKENDS,
        ),
        3,
        &["exactly one IPv4 address:port"],
    );
}

#[test]
fn xdp_with_ipv6_backend_is_rejected() {
    let backends = "\n[[service.backend]]\nname = \"v6\"\naddress = \"[2001:db8::2]:25\"\n";
    assert_rejected(
        &xdp_service("\"198.18.0.100:25\"", "", backends),
        10,
        &["backend \"v6\"", "IPv6", "IPv4 only"],
    );
}

#[test]
fn xdp_ipv6_backend_is_named_even_after_a_bad_one() {
    let backends = "\n[[service.backend]]\nname = \"bad\"\naddress = \"mta.example:25\"\n\n[[service.backend]]\nname = \"v6\"\naddress = \"[2001:db8::2]:25\"\n";
    assert_rejected(
        &xdp_service("\"198.18.0.100:25\"", "", backends),
        10,
        &["backend \"bad\"", "not an IP address"],
    );
    assert_rejected(
        &xdp_service("\"198.18.0.100:25\"", "", backends),
        14,
        &["backend \"v6\"", "IPv4 only"],
    );
}

#[test]
fn xdp_with_proxy_protocol_is_rejected() {
    assert_rejected(
        &xdp_service(
            "\"198.18.0.100:25\"",
            "proxy_protocol = \"v2\"\n",
            GOOD_BACKENDS,
        ),
        5,
        &["proxy_protocol must be \"none\" with dataplane = \"xdp\""],
    );
}

#[test]
fn xdp_unknown_forwarding_lists_valid_ones() {
    assert_rejected(
        &format!(
            "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\nforwarding = \"tunnel\"\n{GOOD_BACKENDS}"
        ),
        7,
        &["xdp.forwarding \"tunnel\"", "dsr, nat"],
    );
}

#[test]
fn xdp_interface_missing_or_bad_is_rejected() {
    assert_rejected(
        &format!(
            "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\nforwarding = \"nat\"\n{GOOD_BACKENDS}"
        ),
        6,
        &["xdp.interface is missing"],
    );
    assert_rejected(
        &format!(
            "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"a-very-long-interface-name\"\n{GOOD_BACKENDS}"
        ),
        6,
        &["xdp.interface", "not a network interface name"],
    );
}

#[test]
fn xdp_flow_table_size_out_of_range_is_rejected() {
    assert_rejected(
        &format!(
            "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\nflow_table_size = 0\n{GOOD_BACKENDS}"
        ),
        7,
        &["xdp.flow_table_size must be between 1024 and 67108864, got 0"],
    );
}

#[test]
fn xdp_pin_of_wrong_type_is_named() {
    assert_rejected(
        &format!(
            "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\npin = \"yes\"\n{GOOD_BACKENDS}"
        ),
        7,
        &["service.xdp.pin", "expected a boolean"],
    );
}

#[test]
fn xdp_services_must_agree_on_pin() {
    let second = "[[service]]\nname = \"fast2\"\nlisten = \"198.18.0.101:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\npin = true\n";
    assert_rejected(
        &format!(
            "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\n[service.xdp]\ninterface = \"eth0\"\n{GOOD_BACKENDS}\n{second}{GOOD_BACKENDS}"
        ),
        22,
        &[
            "service \"fast2\"",
            "xdp.pin = true differs from service \"fast\"",
        ],
    );
}

#[test]
fn backend_drain_of_wrong_type_is_named() {
    assert_rejected(
        &format!(
            "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"127.0.0.1:2601\"\ndrain = 1\n"
        ),
        8,
        &["service.backend.drain", "expected a boolean"],
    );
}

#[test]
fn drained_backend_is_shown_in_the_summary() {
    let out = assert_accepted(&format!(
        "{GOOD_SERVICE}\n[[service.backend]]\nname = \"mta1\"\naddress = \"127.0.0.1:2601\"\ndrain = true\n\n[[service.backend]]\nname = \"mta2\"\naddress = \"127.0.0.1:2602\"\ndrain = false\n"
    ));
    assert!(
        out.contains("backend \"mta1\": 127.0.0.1:2601 weight 1 max_connections unlimited (drain: no new sessions)"),
        "{out}"
    );
    assert!(
        out.contains("backend \"mta2\": 127.0.0.1:2602 weight 1 max_connections unlimited\n"),
        "{out}"
    );
}

#[test]
fn valid_xdp_service_is_accepted_with_defaults() {
    let out = assert_accepted(&format!(
        "[[service]]\nname = \"fast\"\nlisten = \"198.18.0.100:25\"\ndataplane = \"xdp\"\nalgorithm = \"ip_hash\"\n[service.xdp]\ninterface = \"sy-lb0\"\nforwarding = \"nat\"\n{GOOD_BACKENDS}"
    ));
    assert!(out.contains("dataplane xdp (nat on sy-lb0)"), "{out}");
    assert!(out.contains("algorithm ip_hash"), "{out}");
}

// ---------------------------------------------------------------------------------------
// Everything at once; valid configs; the shipped examples; the command line

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
fn minimal_config_gets_the_documented_defaults() {
    let out = assert_accepted(&format!(
        "[[service]]\nname = \"mx\"\nlisten = [\"127.0.0.1:2525\", \"[::1]:2525\"]\n{GOOD_BACKENDS}"
    ));
    assert!(
        out.contains("service \"mx\": listen 127.0.0.1:2525, [::1]:2525;"),
        "{out}"
    );
    assert!(out.contains("algorithm least_conn"), "{out}");
    assert!(out.contains("dataplane proxy"), "{out}");
    assert!(out.contains("proxy_protocol none"), "{out}");
    assert!(
        out.contains("health smtp every 2s (timeout 1s, rise 2, fall 2)"),
        "{out}"
    );
    assert!(out.contains("shutdown_timeout 30s"), "{out}");
    assert!(out.contains("workers auto"), "{out}");
    assert!(
        out.contains("backend \"mta1\": 127.0.0.1:2601 weight 1 max_connections unlimited"),
        "{out}"
    );
    assert!(
        out.contains("backend \"mta2\": 127.0.0.1:2602 weight 1 max_connections unlimited"),
        "{out}"
    );
}

#[test]
fn full_config_is_summarised() {
    let out = assert_accepted(
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
    );
    assert!(out.contains("algorithm weighted_round_robin"), "{out}");
    assert!(out.contains("proxy_protocol v2"), "{out}");
    assert!(
        out.contains("health tcp every 5s (timeout 5s, rise 3, fall 1)"),
        "{out}"
    );
    assert!(
        out.contains("backend \"big\": [::1]:2601 weight 1000 max_connections 100"),
        "{out}"
    );
    assert!(out.contains("shutdown_timeout 1m"), "{out}");
    assert!(out.contains("workers 3"), "{out}");
}

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("config")
        .join(name)
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
fn shipped_xdp_example_passes_check_once_uncommented() {
    // The commented-out XDP service in switchyard.toml must stay a valid example.
    let shipped_text =
        std::fs::read_to_string(shipped("switchyard.toml")).expect("read switchyard.toml");
    let start = shipped_text
        .find("# [[service]]")
        .expect("commented XDP example");
    let example: String = shipped_text[start..]
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .map(|l| format!("{l}\n"))
        .collect();
    let out = assert_accepted(&example);
    assert!(out.contains("dataplane xdp"), "{out}");
}

#[test]
fn shipped_demo_toml_passes_check() {
    let out = check(&shipped("demo.toml"));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.contains("listen 127.0.0.1:2525;"), "{stdout}");
    assert!(stdout.contains("algorithm least_conn"), "{stdout}");
    assert!(
        stdout.contains("health smtp every 1s (timeout 1s, rise 2, fall 2)"),
        "{stdout}"
    );
    for port in [2601, 2602, 2603] {
        assert!(stdout.contains(&format!("127.0.0.1:{port}")), "{stdout}");
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
