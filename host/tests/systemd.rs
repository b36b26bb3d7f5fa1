//! The systemd units in `examples/systemd/`: `systemd-analyze` accepts them and rates them
//! "OK" or better, and the binary runs as an unprivileged user with the file modes they document.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::WAIT;

/// The units, as shipped.
const UNITS: &[&str] = &["sluice-edge.service", "sluice-connector.service"];
/// Worst overall exposure `systemd-analyze security` may report ("OK" ends at 4.9).
const MAX_EXPOSURE: f64 = 4.9;
/// uid and gid of `nobody`/`nogroup`, which the unprivileged runs use.
const NOBODY: u32 = 65534;

#[test]
fn units_pass_systemd_analyze_verify_and_security() {
    let version = analyze(&["--version"]);
    let major: u32 = String::from_utf8_lossy(&version.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 252,
        "systemd-analyze security --offline needs systemd 252 or later; this is:\n{}",
        String::from_utf8_lossy(&version.stdout)
    );
    assert!(
        Path::new("/bin/kill").exists(),
        "ExecReload= runs /bin/kill, which is missing: install it with `apt-get install procps`"
    );

    // `verify` checks that every Exec*= binary exists: point ExecStart= at the built binary.
    let dir = TempDir::new("units");
    let mut copies = Vec::new();
    for name in UNITS {
        let text = unit_text(name);
        assert!(
            text.contains("/usr/local/bin/sluice "),
            "{name}: no ExecStart"
        );
        let copy = dir.0.join(name);
        let exe = env!("CARGO_BIN_EXE_sluice");
        std::fs::write(&copy, text.replace("/usr/local/bin/sluice", exe)).unwrap();
        copies.push(copy);
    }
    let mut args = vec!["verify".to_string()];
    args.extend(copies.iter().map(|p| p.display().to_string()));
    let out = analyze(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify found problems ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    for name in UNITS {
        let path = unit_path(name);
        let out = analyze(&["security", "--offline=true", &path.display().to_string()]);
        let report = String::from_utf8_lossy(&out.stdout);
        let needle = format!("Overall exposure level for {name}:");
        let exposure: f64 = report
            .lines()
            .find_map(|l| l.split_once(&needle))
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no overall exposure in the output of systemd-analyze security ({}):\n{report}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        println!("{name}: overall exposure {exposure}");
        assert!(
            exposure <= MAX_EXPOSURE,
            "{name}: exposure {exposure} is above {MAX_EXPOSURE}:\n{report}"
        );
    }
}

#[test]
fn units_keep_what_the_binary_and_their_comments_rely_on() {
    for name in UNITS {
        let text = unit_text(name);
        let service = Service::read(name);
        assert_eq!(service.one("Type"), "notify", "{name}");
        assert_eq!(service.one("NotifyAccess"), "main", "{name}");
        assert_eq!(
            service.one("ExecReload"),
            "/bin/kill -HUP $MAINPID",
            "{name}"
        );
        assert_eq!(service.one("DynamicUser"), "yes", "{name}");
        let role = name
            .trim_start_matches("sluice-")
            .trim_end_matches(".service");
        let config = format!("--config /etc/sluice/{role}.toml");
        assert_eq!(
            service.one("ExecStartPre"),
            format!("/usr/local/bin/sluice check {config}"),
            "{name}"
        );
        assert_eq!(
            service.one("ExecStart"),
            format!("/usr/local/bin/sluice {role} {config}"),
            "{name}"
        );
        // grace-period defaults to 30 s: systemd must not kill a process still draining.
        let stop: u64 = service.one("TimeoutStopSec").parse().unwrap();
        assert!(stop > 30, "{name}: TimeoutStopSec={stop}");
        assert_eq!(
            service.one("RestrictAddressFamilies"),
            "AF_INET AF_INET6 AF_UNIX",
            "{name}"
        );
        // Every credential path the comments tell the config to use is loaded by this unit.
        let ids: Vec<&str> = service
            .all("LoadCredential")
            .iter()
            .map(|v| v.split(':').next().unwrap())
            .collect();
        assert!(!ids.is_empty(), "{name}: no LoadCredential=");
        let prefix = format!("/run/credentials/{name}/");
        let mut named = 0;
        for line in text.lines().filter(|l| l.starts_with('#')) {
            for (i, _) in line.match_indices("/run/credentials/") {
                let rest = &line[i..];
                assert!(rest.starts_with(&prefix), "{name}: {line}");
                let id: String = rest[prefix.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
                    .collect();
                if !id.is_empty() && id != "ID" {
                    assert!(ids.contains(&id.as_str()), "{name}: {id} is not loaded");
                    named += 1;
                }
            }
        }
        assert!(named > 0, "{name}: the comments name no credential path");
    }
    let edge = Service::read("sluice-edge.service");
    assert_eq!(edge.one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert_eq!(edge.one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    let connector = Service::read("sluice-connector.service");
    // wasmtime writes native code and then makes it executable.
    assert!(connector.all("MemoryDenyWriteExecute").is_empty());
    assert_eq!(connector.one("LogsDirectory"), "sluice");
}

/// The dedicated-user layout the units document (files root:GROUP 0640 in a root:GROUP 0750
/// folder, the audit file in a folder the user owns), with nobody/nogroup as user and group:
/// `sluice check`, an edge and a connector (with a Wasm plugin) run as nobody, and a file only
/// root can read is refused with an error naming it.
#[test]
fn edge_and_connector_run_unprivileged_with_the_documented_file_modes() {
    assert!(
        std::fs::metadata("/proc/self").unwrap().uid() == 0,
        "this test must run as root: it creates root-owned files and runs sluice as uid {NOBODY} \
         through setpriv (CI runs as root)"
    );
    match Command::new("setpriv").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        _ => panic!("setpriv is missing: install it with `apt-get install util-linux`"),
    }

    let base = TempDir::new("unprivileged");
    let etc = base.0.join("etc");
    let logs = base.0.join("log");
    let out = base.0.join("out");
    make_dir(&base.0, 0o755, 0, 0);
    make_dir(&etc, 0o750, 0, NOBODY);
    make_dir(&logs, 0o750, NOBODY, NOBODY);
    make_dir(&out, 0o700, 0, 0);
    let exe = executable_by_nobody(&base.0);

    // As the operator would: `sluice tunnel new` writes the token (0600, root's), then it is
    // handed to the group.
    let token = etc.join("app.token");
    let created = run_as_root(
        &exe,
        &[
            "tunnel",
            "new",
            "app",
            "--hostname",
            "app.test",
            "--token-file",
        ],
        &token,
    );
    let block = created
        .split_once("[[tunnel]]")
        .map(|(_, b)| format!("[[tunnel]]{b}"))
        .expect("`sluice tunnel new` printed no [[tunnel]] block");
    let meta = std::fs::metadata(&token).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o600, 0), "token file");
    set_owner_mode(&token, 0o640, 0, NOBODY);

    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    install(&etc.join("edge.crt"), ck.cert.pem());
    install(&etc.join("edge.key"), ck.key_pair.serialize_pem());
    let plugin = std::fs::read(support::example_plugin("audit-log")).unwrap();
    make_dir(&etc.join("plugins"), 0o750, 0, NOBODY);
    install(&etc.join("plugins/audit_log.wasm"), &plugin);
    install(
        &etc.join("edge.toml"),
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\
             [https]\nlisten = \"127.0.0.1:0\"\ncert = \"edge.crt\"\nkey = \"edge.key\"\n\
             [connectors]\nlisten = \"127.0.0.1:0\"\ncert = \"edge.crt\"\nkey = \"edge.key\"\n\
             {block}\n"
        ),
    );

    let check = run_as_nobody(&exe, &["check", "--config"], &etc.join("edge.toml"), &out);
    assert!(
        check.status.success() && String::from_utf8_lossy(&check.stdout).contains("valid edge"),
        "sluice check (edge) as nobody: {}",
        text(&check)
    );
    let mut edge = Proc::spawn_as_nobody(&exe, "edge", &etc.join("edge.toml"), &out);
    let quic = edge.listening("listening for connectors (QUIC)");
    let http = edge.listening("listening for clients (HTTP)");
    let edge_admin = edge.listening("listening for admin requests");
    assert_eq!(
        http_get(edge_admin, "localhost", "/ready").map(|r| r.0),
        Some(200)
    );

    let audit = logs.join("audit.jsonl");
    install(
        &etc.join("connector.toml"),
        format!(
            "tunnel = \"app\"\ntoken-file = \"app.token\"\nedges = [\"{quic}\"]\n\
             edge-ca = \"edge.crt\"\nedge-server-name = \"localhost\"\nplugins = [\"audit\"]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [[plugin]]\nname = \"audit\"\npath = \"plugins/audit_log.wasm\"\n\
             # A debug build on a busy machine: room beyond the 10 ms default.\n\
             timeout = \"2s\"\n\
             [audit]\nfile = \"{}\"\n\
             [[origin]]\nname = \"hello\"\nurl = \"hello\"\n\
             [[ingress]]\norigin = \"hello\"\n",
            audit.display()
        ),
    );
    let check = run_as_nobody(
        &exe,
        &["check", "--config"],
        &etc.join("connector.toml"),
        &out,
    );
    assert!(
        check.status.success()
            && String::from_utf8_lossy(&check.stdout).contains("valid connector"),
        "sluice check (connector) as nobody: {}",
        text(&check)
    );
    let mut connector = Proc::spawn_as_nobody(&exe, "connector", &etc.join("connector.toml"), &out);
    let admin = connector.listening("listening for admin requests");
    connector.wait_until("the connector's /ready to answer 200", || {
        (http_get(admin, "localhost", "/ready")?.0 == 200).then_some(())
    });

    // A request through the tunnel; the plugin's audit line lands in the service's folder.
    let (status, body) = http_get(http, "app.test", "/as-nobody").expect("no answer");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("/as-nobody"), "{body}");
    connector.wait_until("the audit line", || {
        let text = std::fs::read_to_string(&audit).ok()?;
        text.contains("\"path\":\"/as-nobody\"").then_some(())
    });
    assert_eq!(std::fs::metadata(&audit).unwrap().uid(), NOBODY);

    // Files only root can read: the error names the file and says why.
    let hidden_token = etc.join("root-only.token");
    run_as_root(
        &exe,
        &[
            "tunnel",
            "new",
            "root-only",
            "--hostname",
            "r.test",
            "--token-file",
        ],
        &hidden_token,
    );
    let hidden_key = etc.join("root-only.key");
    std::fs::write(&hidden_key, ck.key_pair.serialize_pem()).unwrap();
    set_owner_mode(&hidden_key, 0o600, 0, 0);
    let bad_connector = etc.join("connector-root-only.toml");
    install(
        &bad_connector,
        format!(
            "tunnel = \"app\"\ntoken-file = \"root-only.token\"\nedges = [\"{quic}\"]\n\
             [[ingress]]\norigin = \"hello\"\n[[origin]]\nname = \"hello\"\nurl = \"hello\"\n"
        ),
    );
    let bad_edge = etc.join("edge-root-only.toml");
    install(
        &bad_edge,
        format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n\
             [connectors]\nlisten = \"127.0.0.1:0\"\ncert = \"edge.crt\"\nkey = \"root-only.key\"\n\
             {block}\n"
        ),
    );
    let refused = [
        (&bad_connector, "connector", &hidden_token),
        (&bad_edge, "edge", &hidden_key),
    ];
    for (config, role, file) in refused {
        let names_file_and_cause = |log: &str| {
            log.contains(&file.display().to_string()) && log.contains("Permission denied")
        };
        let check = run_as_nobody(&exe, &["check", "--config"], config, &out);
        assert!(
            !check.status.success()
                && names_file_and_cause(&String::from_utf8_lossy(&check.stderr)),
            "sluice check of {}: expected \"Permission denied\" naming {}, got {}",
            config.display(),
            file.display(),
            text(&check)
        );
        let mut proc = Proc::spawn_as_nobody(&exe, role, config, &out);
        let status = proc.wait_exit();
        assert!(
            !status.success(),
            "sluice {role} started without {}",
            file.display()
        );
        assert!(
            names_file_and_cause(&proc.log()),
            "sluice {role}: expected \"Permission denied\" naming {}:\n{}",
            file.display(),
            proc.log()
        );
    }

    // SIGTERM: both stop cleanly (the connector drains first).
    for proc in [&mut connector, &mut edge] {
        proc.signal("TERM");
        let status = proc.wait_exit();
        assert!(
            status.success(),
            "{} exited with {status}:\n{}",
            proc.name,
            proc.log()
        );
    }
}

/// Runs `systemd-analyze ARGS`; a missing systemd-analyze fails the test with how to get it.
fn analyze(args: &[&str]) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "cat")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run systemd-analyze ({e}): install it with \
                 `apt-get install --no-install-recommends systemd`"
            )
        })
}

fn unit_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/systemd")
        .join(name)
}

fn unit_text(name: &str) -> String {
    std::fs::read_to_string(unit_path(name)).unwrap()
}

/// The `key=value` lines of a unit's `[Service]` section.
struct Service {
    unit: String,
    keys: Vec<(String, String)>,
}

impl Service {
    fn read(unit: &str) -> Service {
        let text = unit_text(unit);
        let mut section = "";
        let mut keys = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line;
            } else if section == "[Service]" && !line.starts_with('#') {
                if let Some((k, v)) = line.split_once('=') {
                    keys.push((k.to_string(), v.to_string()));
                }
            }
        }
        Service {
            unit: unit.to_string(),
            keys,
        }
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.keys
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn one(&self, key: &str) -> &str {
        match self.all(key)[..] {
            [v] => v,
            ref vs => panic!("{}: expected one {key}=, found {vs:?}", self.unit),
        }
    }
}

/// A folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("sluice-systemd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn make_dir(dir: &Path, mode: u32, uid: u32, gid: u32) {
    std::fs::create_dir_all(dir).unwrap();
    set_owner_mode(dir, mode, uid, gid);
}

fn set_owner_mode(path: &Path, mode: u32, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Writes a file root:nogroup 0640, as the dedicated-user layout has them.
fn install(path: &Path, contents: impl AsRef<[u8]>) {
    std::fs::write(path, contents).unwrap();
    set_owner_mode(path, 0o640, 0, NOBODY);
}

/// The built binary if nobody may run it where it is (every folder above it and the file
/// itself executable by others), else a copy in `dir`.
fn executable_by_nobody(dir: &Path) -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_sluice"));
    let reachable = exe
        .ancestors()
        .all(|p| std::fs::metadata(p).is_ok_and(|m| m.mode() & 0o001 != 0));
    if reachable {
        return exe;
    }
    let copy = dir.join("sluice");
    std::fs::copy(&exe, &copy).unwrap();
    set_owner_mode(&copy, 0o755, 0, 0);
    copy
}

fn text(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `sluice ARGS PATH` as root; its stdout.
fn run_as_root(exe: &Path, args: &[&str], path: &Path) -> String {
    let out = Command::new(exe).args(args).arg(path).output().unwrap();
    assert!(out.status.success(), "sluice {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn as_nobody(exe: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .args(["--clear-groups", "--"])
        .arg(exe)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    cmd
}

/// `sluice ARGS PATH` as nobody, bounded by [`WAIT`]; its output goes through files in `out`.
fn run_as_nobody(exe: &Path, args: &[&str], path: &Path, out: &Path) -> Output {
    let mut cmd = as_nobody(exe);
    cmd.args(args).arg(path);
    let stem = path.file_stem().unwrap().to_string_lossy();
    let mut proc = Proc::spawn(
        cmd,
        &format!("sluice {args:?}"),
        &out.join(format!("{stem}.check")),
    );
    let status = proc.wait_exit();
    let stdout = std::fs::read(proc.stdout_path()).unwrap_or_default();
    Output {
        status,
        stdout,
        stderr: proc.log().into_bytes(),
    }
}

/// A child process whose stdout and stderr go to files, killed on drop (also on panic).
struct Proc {
    child: Child,
    name: String,
    stderr: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, name: &str, stderr: &Path) -> Proc {
        let stdout = stderr.with_extension("stdout");
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(stderr).unwrap());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            name: name.to_string(),
            stderr: stderr.to_path_buf(),
        }
    }

    /// `sluice ROLE --config CONFIG` as nobody, its logs in `out`.
    fn spawn_as_nobody(exe: &Path, role: &str, config: &Path, out: &Path) -> Proc {
        let mut cmd = as_nobody(exe);
        cmd.args([role, "--config"]).arg(config);
        let stem = config.file_stem().unwrap().to_string_lossy();
        Proc::spawn(
            cmd,
            &format!("sluice {role}"),
            &out.join(format!("{stem}.log")),
        )
    }

    fn stdout_path(&self) -> PathBuf {
        self.stderr.with_extension("stdout")
    }

    /// stderr so far, without colour codes.
    fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.stderr).unwrap_or_default())
    }

    /// Polls `probe` until it gives a value, for at most [`WAIT`]; fails if the process exits.
    fn wait_until<T>(&mut self, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = probe() {
                return v;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}) before {what}:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {what} within {WAIT:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address of the listener whose start line contains `line`.
    fn listening(&mut self, line: &str) -> SocketAddr {
        let stderr = self.stderr.clone();
        self.wait_until(&format!("log line {line:?}"), || {
            let log = strip_ansi(&std::fs::read_to_string(&stderr).ok()?);
            let l = log.lines().find(|l| l.contains(line))?;
            l.split_once(" addr=")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits at most [`WAIT`] for the process to exit.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {WAIT:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `GET path` with `Host: host` over HTTP/1.1; the status and body, or `None` if the
/// connection failed. Every step is bounded by a timeout.
fn http_get(addr: SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    tcp.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    tcp.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((status, body))
}
