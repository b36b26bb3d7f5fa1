//! The binary as a service manager and an operator see it: systemd readiness notifications,
//! log formats, errors printed once and naming what failed, and `sluice status`.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::*;

/// A fresh directory for one test's files.
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-service-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An edge file in `dir` with a certificate beside it, plain HTTP on `http_port`.
fn edge_file(dir: &Path, http_port: u16, extra: &str) -> PathBuf {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("edge.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("edge.key"), ck.key_pair.serialize_pem()).unwrap();
    let hash = hex::encode(sluice::secret::Secret::new("t").sha256());
    let file = dir.join("edge.toml");
    std::fs::write(
        &file,
        format!(
            "{extra}\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n[connectors]\nlisten = \"127.0.0.1:0\"\n\
             cert = \"edge.crt\"\nkey = \"edge.key\"\n[[tunnel]]\nid = \"app\"\ntoken-sha256 = \"{hash}\"\nhostnames = [\"app.test\"]\n"
        ),
    )
    .unwrap();
    file
}

/// The next notification on `sock`, within the test deadline.
fn next_notification(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 1024];
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let n = sock.recv(&mut buf).expect("no notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn the_edge_notifies_systemd_and_logs_json_lines() {
    let d = dir("notify");
    let file = edge_file(&d, 0, "");
    let sock_path = d.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let proc = Proc::spawn_with("edge", &file, |cmd| {
        cmd.env("NOTIFY_SOCKET", &sock_path)
            .arg("--log-format")
            .arg("json");
    });
    let sock = tokio::task::spawn_blocking(move || {
        assert_eq!(next_notification(&sock), "READY=1\n");
        sock
    })
    .await
    .unwrap();
    proc.signal("HUP");
    let sock = tokio::task::spawn_blocking(move || {
        let reloading = next_notification(&sock);
        assert!(
            reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{reloading:?}"
        );
        assert_eq!(next_notification(&sock), "READY=1\n");
        sock
    })
    .await
    .unwrap();
    proc.signal("TERM");
    tokio::task::spawn_blocking(move || assert_eq!(next_notification(&sock), "STOPPING=1\n"))
        .await
        .unwrap();
    proc.wait_log("edge stopped", 1).await;
    // Every line is one JSON object with the level and the message.
    let log = proc.log();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(log.contains("reloaded tunnels"), "{log}");
    drop(proc);
    let _ = std::fs::remove_dir_all(&d);
}

/// Runs `sluice ARGS` to its end (bounded) and returns (exit code, stderr).
fn run_to_end(args: &[&str]) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > WAIT {
            let _ = child.kill();
            panic!("sluice {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

#[test]
fn a_busy_port_is_reported_once_naming_the_listener_without_colour() {
    let d = dir("busy");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();

    // The edge's HTTP listener.
    let edge = edge_file(&d, port, "");
    let (code, err) = run_to_end(&["edge", "--config", edge.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    let needle = format!("failed to bind the http listener on 127.0.0.1:{port}");
    assert_eq!(err.matches(&needle).count(), 1, "{err}");
    assert!(!err.contains('\u{1b}'), "colour codes on a pipe: {err:?}");

    // The connector's admin listener.
    let connector = d.join("connector.toml");
    std::fs::write(
        &connector,
        format!(
            "tunnel = \"app\"\ntoken = \"t\"\nedges = [\"127.0.0.1:9\"]\n[admin]\nlisten = \"127.0.0.1:{port}\"\n\
             [[ingress]]\norigin = \"hello\"\n"
        ),
    )
    .unwrap();
    let (code, err) = run_to_end(&["connector", "--config", connector.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    let needle = format!("failed to bind the admin listener on 127.0.0.1:{port}");
    assert_eq!(err.matches(&needle).count(), 1, "{err}");
    assert_eq!(
        err.lines()
            .filter(|l| l.contains("ERROR") || l.starts_with("error"))
            .count(),
        1,
        "{err}"
    );
    assert!(!err.contains('\u{1b}'), "colour codes on a pipe: {err:?}");

    // A bad file: one plain error naming the file, before any logging.
    std::fs::write(&connector, "tunnel = 3\n").unwrap();
    let (code, err) = run_to_end(&["connector", "--config", connector.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("connector.toml:1:10"),
        "{err}"
    );
    drop(busy);
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn sluice_status_summarises_the_edge_tunnels_and_connections() {
    let origin = echo_origin("web").await;
    let edge = start_edge(
        vec![
            tunnel("app", "t", &["app.test"]),
            tunnel("idle", "u", &["idle.test"]),
        ],
        |c| c.admin_listen = Some(loopback()),
    )
    .await;
    let mut cfg = connector_config(&edge, "app", "t", vec![http_origin("web", origin)], vec![]);
    cfg.connector_id = "replica-1".into();
    let digest = cfg.routing_digest();
    let conn = start_connector(cfg).await;
    conn.registered(2).await;
    let admin = edge.admin.unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["status", "--admin", &admin])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("edge edge (sluice "), "{text}");
    assert!(
        text.contains(&format!(
            "tunnel app: 2 connections, 0 in flight, ingress {digest}"
        )),
        "{text}"
    );
    assert!(
        text.contains("tunnel idle: 0 connections, 0 in flight, OFFLINE"),
        "{text}"
    );
    assert_eq!(text.matches(" replica-1 (sluice/").count(), 2, "{text}");
    conn.stop().await;
}

/// Runs `sluice ARGS` under a pseudo-terminal (`script`, from util-linux) with `env`, and
/// returns what it wrote.
fn on_a_terminal(args: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = std::process::Command::new("script");
    cmd.args([
        "-qec",
        &format!("{} {args}", env!("CARGO_BIN_EXE_sluice")),
        "/dev/null",
    ])
    .env_remove("NO_COLOR")
    .env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .expect("`script` (util-linux) runs sluice on a terminal: apt-get install util-linux");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn colours_only_on_a_terminal_and_never_with_no_color() {
    let d = dir("colour");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let edge = edge_file(&d, busy.local_addr().unwrap().port(), "");
    let args = format!("edge --config {}", edge.display());
    let coloured = on_a_terminal(&args, &[]);
    assert!(
        coloured.contains("failed to bind the http listener"),
        "{coloured}"
    );
    assert!(
        coloured.contains('\u{1b}'),
        "no colour on a terminal: {coloured:?}"
    );
    let plain = on_a_terminal(&args, &[("NO_COLOR", "1")]);
    assert!(
        plain.contains("failed to bind the http listener"),
        "{plain}"
    );
    assert!(
        !plain.contains('\u{1b}'),
        "colour despite NO_COLOR: {plain:?}"
    );
    drop(busy);
    let _ = std::fs::remove_dir_all(&d);
}
