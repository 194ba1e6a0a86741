//! `hyper-floor` forwards what it is sent, both ways, over kept-alive
//! connections, since `bench overhead` measures it as a proxy.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One HTTP/1.1 message: its head (start line and headers) and its body
/// (`content-length` bytes).
fn read_message(reader: &mut BufReader<TcpStream>) -> std::io::Result<(String, Vec<u8>)> {
    let mut head = String::new();
    loop {
        let before = head.len();
        if reader.read_line(&mut head)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if head[before..] == *"\r\n" {
            break;
        }
    }
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok((head, body))
}

/// An upstream that answers each request with its request line, its
/// `host` and its body, and counts the connections it accepts.
fn echo_upstream() -> (std::net::SocketAddr, std::sync::mpsc::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, connections) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let _ = accepted.send(());
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                while let Ok((head, body)) = read_message(&mut reader) {
                    let line = head.lines().next().unwrap_or_default();
                    let host = head
                        .lines()
                        .find_map(|l| l.strip_prefix("host: "))
                        .unwrap_or_default();
                    let reply = [line.as_bytes(), b"\n", host.as_bytes(), b"\n", &body].concat();
                    let response = format!(
                        "HTTP/1.1 201 Created\r\nx-upstream: echo\r\ncontent-length: {}\r\n\r\n",
                        reply.len()
                    );
                    writer.write_all(response.as_bytes()).unwrap();
                    writer.write_all(&reply).unwrap();
                }
            });
        }
    });
    (addr, connections)
}

/// The floor, killed on drop.
struct Floor(Child);

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_floor(upstream: std::net::SocketAddr) -> (Floor, std::net::SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hyper-floor"))
        .args(["--upstream", &upstream.to_string(), "--workers", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("hyper-floor listening listen=")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (Floor(child), addr)
}

#[test]
fn requests_and_answers_pass_through_on_one_kept_alive_connection() {
    let (upstream, connections) = echo_upstream();
    let (_floor, addr) = start_floor(upstream);
    let client = TcpStream::connect(addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = client.try_clone().unwrap();
    let mut reader = BufReader::new(client);
    for (i, path) in ["/v1/completions", "/tokenize?x=1"].iter().enumerate() {
        let body = format!(r#"{{"prompt":"request {i}"}}"#);
        write!(
            writer,
            "POST {path} HTTP/1.1\r\nhost: sluice\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let (head, reply) = read_message(&mut reader).unwrap();
        assert!(head.starts_with("HTTP/1.1 201 Created\r\n"), "{head}");
        assert!(head.contains("x-upstream: echo\r\n"), "{head}");
        assert_eq!(
            String::from_utf8(reply).unwrap(),
            format!("POST {path} HTTP/1.1\nsluice\n{body}")
        );
    }
    // Both requests went over the one upstream connection opened for this client.
    connections.recv_timeout(Duration::from_secs(1)).unwrap();
    assert!(
        connections.try_recv().is_err(),
        "a second upstream connection"
    );
}

/// Runs the floor with one argument, to its exit.
fn run_floor_with(arg: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hyper-floor"))
        .arg(arg)
        .output()
        .unwrap()
}

#[test]
fn an_unknown_flag_is_a_usage_error() {
    let output = run_floor_with("--bogus");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown flag --bogus"), "{stderr}");
    assert!(stderr.contains("usage: hyper-floor"), "{stderr}");
}

#[tokio::test]
async fn h2c_requests_go_upstream_as_http_1_1() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let (upstream, _connections) = echo_upstream();
    let (_floor, addr) = start_floor(upstream);
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::post("http://engine.test/v1/completions?n=2")
        .body(Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    // Origin-form target, HTTP/1.1, and the authority as `host`.
    assert_eq!(
        String::from_utf8(body.to_vec()).unwrap(),
        "POST /v1/completions?n=2 HTTP/1.1\nengine.test\n{}"
    );
}

#[test]
fn help_is_printed_once_and_is_not_an_error() {
    let output = run_floor_with("--help");
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.matches("usage: hyper-floor").count(), 1, "{stdout}");
}
