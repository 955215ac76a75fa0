//! `lutra serve` end to end: the real binary on the fetched SmolLM2-135M-Instruct Q4_1 model
//! (`models/fetch.sh`), spoken to over loopback HTTP/1.1 by a small client written here.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lutra_runtime::chat::Message;
use lutra_runtime::llama::{LoadOptions, Model};
use serde_json::{json, Value};

fn model_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run `bash models/fetch.sh` first",
        path.display()
    );
    path
}

/// A running `lutra serve`; killed when dropped.
struct Server {
    child: Child,
    /// `127.0.0.1:PORT`.
    addr: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `lutra serve -m SmolLM2 --port 0 -t 2` with `extra` flags and waits for its
    /// listening line.
    fn start(extra: &[&str]) -> Server {
        let model = model_path();
        let mut child = Command::new(env!("CARGO_BIN_EXE_lutra"))
            .args([
                "serve",
                "-m",
                model.to_str().unwrap(),
                "--port",
                "0",
                "-t",
                "2",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("lutra serve starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = String::new();
            let _ = err_pipe.read_to_string(&mut buf);
            sink.lock().unwrap().push_str(&buf);
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut server = Server {
            child,
            addr: String::new(),
            stderr,
        };
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no listening line; stderr:\n{}", server.stderr()));
        let addr = line
            .strip_prefix("lutra serve: listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        server.addr = addr.to_string();
        server
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one request and reads the whole answer.
    fn request(&self, method: &str, path: &str, headers: &[&str], body: &str) -> HttpResponse {
        let mut stream = self.send(method, path, headers, body);
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).expect("read the response");
        HttpResponse::parse(&raw)
    }

    fn post(&self, path: &str, body: &Value) -> HttpResponse {
        self.request("POST", path, &[], &body.to_string())
    }

    fn get(&self, path: &str) -> HttpResponse {
        self.request("GET", path, &[], "")
    }

    /// Opens a connection and writes a request on it.
    fn send(&self, method: &str, path: &str, headers: &[&str], body: &str) -> TcpStream {
        let mut stream = TcpStream::connect(&self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body.as_bytes()).unwrap();
        stream
    }

    /// A greedy chat completion's text.
    fn chat_text(&self, user: &str, max_tokens: usize) -> String {
        let r = self.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": user}], "temperature": 0, "max_tokens": max_tokens}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// SIGTERM, then the exit code (within 30 s).
    fn terminate(mut self) -> Option<i32> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the server did not stop after SIGTERM; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Resident memory of the server process, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A parsed HTTP response.
struct HttpResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResponse {
    fn parse(raw: &[u8]) -> HttpResponse {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
        {
            body = dechunk(&body);
        }
        HttpResponse {
            status,
            headers,
            body: String::from_utf8(body).expect("UTF-8 body"),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        assert_eq!(self.header("content-type"), Some("text/event-stream"));
        self.body
            .split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                    .to_string()
            })
            .collect()
    }

    /// Asserts an OpenAI error object with this status; returns it.
    fn error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        e.clone()
    }
}

/// Decodes a chunked transfer-encoded body.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = std::str::from_utf8(&data[..line_end]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// The chat prompt the server renders for these messages, as text.
fn rendered_prompt(model: &Model, messages: &[Message]) -> String {
    lutra_runtime::session::chat_prompt(model, messages)
        .expect("chat prompt")
        .text
}

#[test]
fn chat_streamed_and_not_agree_and_equal_lutra_generate() {
    let server = Server::start(&[]);
    let question = "What is the capital of France?";
    let n = 24;
    let messages = json!([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]);
    let plain = server.post(
        "/v1/chat/completions",
        &json!({"model": "anything", "messages": messages, "temperature": 0, "max_tokens": n, "user": "extra fields are ignored"}),
    );
    assert_eq!(plain.status, 200, "{}", plain.body);
    let v = plain.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "SmolLM2-135M-Instruct.Q4_1");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    let usage = &v["usage"];
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
    assert!(
        completion_tokens >= 1 && completion_tokens <= n as u64,
        "{usage}"
    );
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion_tokens
    );
    let finish = choice["finish_reason"].as_str().unwrap();
    assert_eq!(finish == "length", completion_tokens == n as u64, "{v}");

    // The same request streamed: role first, then pieces, the finish reason, usage, [DONE].
    let streamed = server.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "temperature": 0, "max_tokens": n, "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    let events = streamed.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage_chunk["usage"], *usage);
    let finish_chunk = &chunks[chunks.len() - 2];
    assert_eq!(finish_chunk["choices"][0]["finish_reason"], finish);
    let deltas: String = chunks[1..chunks.len() - 2]
        .iter()
        .map(|c| {
            assert!(c["choices"][0]["finish_reason"].is_null());
            c["choices"][0]["delta"]["content"].as_str().unwrap()
        })
        .collect();
    assert!(chunks.len() > 4, "the text came in pieces: {chunks:?}");
    assert_eq!(deltas, text);

    // `lutra generate` on the rendered prompt gives the same text.
    let model = Model::load(
        &model_path(),
        &LoadOptions {
            threads: 1,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let prompt = rendered_prompt(
        &model,
        &[
            Message::new("system", "Answer briefly."),
            Message::new("user", question),
        ],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_lutra"))
        .args([
            "generate",
            "-m",
            model_path().to_str().unwrap(),
            "-t",
            "2",
            "--temp",
            "0",
        ])
        .args(["-n", &n.to_string(), "-p", &prompt])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), text);

    // A stop string is cut from the text, streamed or not, and ends with "stop".
    let cut = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop: String = text[cut..].chars().take(3).collect();
    let stop = stop.as_str();
    let expected = &text[..text.find(stop).unwrap()];
    let body = json!({"messages": messages, "temperature": 0, "max_tokens": n, "stop": [stop, "never appears"]});
    let r = server.post("/v1/chat/completions", &body).json();
    assert_eq!(
        r["choices"][0]["message"]["content"], expected,
        "stop {stop:?}"
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    let mut body = body;
    body["stream"] = json!(true);
    let events = server.post("/v1/chat/completions", &body).events();
    let deltas: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(deltas, expected, "stop {stop:?}");
    assert_eq!(server.terminate(), Some(0));
}

#[test]
fn completions_models_health_and_tokenize() {
    let server = Server::start(&[]);
    assert_eq!(server.get("/health").json(), json!({"status": "ok"}));
    let models = server.get("/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(models["data"].as_array().unwrap().len(), 1);

    let prompt = "The capital of France is";
    let r = server.post(
        "/v1/completions",
        &json!({"prompt": prompt, "temperature": 0, "max_tokens": 8}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    // An array of one string is the same prompt; streamed pieces join to the same text.
    let r = server.post(
        "/v1/completions",
        &json!({"prompt": [prompt], "temperature": 0, "max_tokens": 8, "stream": true}),
    );
    let events = r.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let joined: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(joined, text);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );

    // Tokenize and detokenize round trip.
    let content = "Hello world, <|im_start|>user ünïcödé";
    let t = server
        .post("/tokenize", &json!({"content": content}))
        .json();
    let ids: Vec<u64> = t["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(ids.len() > 5);
    let im_start = 1; // SmolLM2's <|im_start|>: special-token text is parsed.
    assert!(ids.contains(&im_start), "{ids:?}");
    let back = server.post("/detokenize", &json!({"tokens": ids})).json();
    assert_eq!(back["content"], content);
    let pieces = server
        .post(
            "/tokenize",
            &json!({"content": "Hello world", "with_pieces": true}),
        )
        .json();
    assert_eq!(pieces["tokens"][0]["piece"], "Hello");
    assert_eq!(pieces["tokens"][1]["piece"], " world");
    server
        .post("/detokenize", &json!({"tokens": [99_999_999]}))
        .error(400);
    assert_eq!(server.terminate(), Some(0));
}

#[test]
fn errors_have_the_openai_shape_and_status() {
    let server = Server::start(&["-c", "64", "--api-key", "sesame"]);
    let auth = "Authorization: Bearer sesame";
    let chat = |body: &str| server.request("POST", "/v1/chat/completions", &[auth], body);
    let hi = r#""messages":[{"role":"user","content":"hi"}]"#;

    // 401 without or with a wrong key; /health stays open.
    let e = server
        .request("POST", "/v1/chat/completions", &[], &format!("{{{hi}}}"))
        .error(401);
    assert_eq!(e["type"], "authentication_error");
    server
        .request("GET", "/v1/models", &["Authorization: Bearer wrong"], "")
        .error(401);
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(server.request("GET", "/v1/models", &[auth], "").status, 200);

    // 400: bad JSON, wrong types (the field is named), bad values, bad messages.
    let e = chat("{not json").error(400);
    assert!(e["message"].as_str().unwrap().contains("JSON"), "{e}");
    let e = chat(&format!(r#"{{{hi},"temperature":"warm"}}"#)).error(400);
    assert_eq!(e["param"], "temperature");
    assert!(
        e["message"].as_str().unwrap().contains("temperature"),
        "{e}"
    );
    let e = chat(&format!(r#"{{{hi},"max_tokens":"12"}}"#)).error(400);
    assert_eq!(e["param"], "max_tokens");
    let e = chat(&format!(r#"{{{hi},"max_tokens":0}}"#)).error(400);
    assert_eq!(e["param"], "max_tokens");
    let e = chat(&format!(r#"{{{hi},"temperature":-1}}"#)).error(400);
    assert_eq!(e["param"], "temperature");
    let e = chat(r#"{"messages":[{"role":"robot","content":"hi"}]}"#).error(400);
    assert_eq!(e["param"], "messages[0].role");
    let e = chat(r#"{"messages":[]}"#).error(400);
    assert_eq!(e["param"], "messages");
    let e = server
        .request(
            "POST",
            "/v1/completions",
            &[auth],
            r#"{"prompt":["a","b"]}"#,
        )
        .error(400);
    assert_eq!(e["param"], "prompt");

    // 400: a prompt longer than the context of 64 tokens.
    let long = "word ".repeat(100);
    let e = chat(&json!({"messages": [{"role": "user", "content": long}]}).to_string()).error(400);
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(e["param"], "messages");
    let e = server
        .request(
            "POST",
            "/v1/completions",
            &[auth],
            &json!({"prompt": long}).to_string(),
        )
        .error(400);
    assert_eq!(e["code"], "context_length_exceeded");

    // 413: a body over 4 MiB.
    let big = json!({"messages": [{"role": "user", "content": "a".repeat(5 << 20)}]}).to_string();
    let e = big_request(&server.addr, auth, &big).error(413);
    assert_eq!(e["code"], "request_too_large");

    // 404 in the same shape.
    server.request("GET", "/v2/nothing", &[auth], "").error(404);

    // A request within the context still works on this server.
    let ok = chat(&format!(r#"{{{hi},"max_tokens":3,"temperature":0}}"#));
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(server.terminate(), Some(0));
}

/// Posts a body too big to be read whole: it is written from another thread while the answer is
/// read (the server answers before reading it all).
fn big_request(addr: &str, auth: &str, body: &str) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut writer = stream.try_clone().unwrap();
    let body = body.to_string();
    let write = std::thread::spawn(move || {
        // The server may close the connection before the whole body is sent.
        let _ = writer
            .write_all(head.as_bytes())
            .and_then(|()| writer.write_all(body.as_bytes()));
    });
    let mut raw = Vec::new();
    // A reset after the answer arrived ends the read; what was read is the answer.
    let _ = stream.read_to_end(&mut raw);
    write.join().unwrap();
    HttpResponse::parse(&raw)
}

/// Opens a streamed request and reads until `marker` arrives (the request was accepted and is
/// streaming); returns the connection, still open.
fn open_stream(server: &Server, path: &str, body: &Value, marker: &str) -> TcpStream {
    let mut stream = server.send("POST", path, &[], &body.to_string());
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(marker) {
        let n = stream.read(&mut buf).expect("stream data");
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    stream
}

#[test]
fn a_full_queue_is_503_and_a_client_that_leaves_cancels_its_generation() {
    let server = Server::start(&["--parallel", "1", "--queue", "1"]);
    // A long generation (no end of text) holds the only slot...
    let long = json!({"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": true, "stream": true, "temperature": 0});
    let running = open_stream(&server, "/v1/completions", &long, "\"text\"");
    // ...a second request waits (its stream opens with the role chunk before any token)...
    let short =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": true});
    let waiting = open_stream(&server, "/v1/chat/completions", &short, "\"role\"");
    // ...and a third finds the queue full.
    let e = server
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .error(503);
    assert_eq!(e["code"], "queue_full");
    assert_eq!(e["type"], "unavailable_error");

    // The first client leaves: its generation stops, the waiting one runs, and the queue has room
    // again long before 3000 tokens could have been generated.
    drop(running);
    let mut rest = String::new();
    let mut waiting = waiting;
    waiting.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("data: [DONE]"), "{rest}");
    assert_slot_freed(&server, "the abandoned generation");

    // The same for a client that leaves while waiting for a whole (not streamed) answer.
    let mut whole = long.clone();
    whole["stream"] = json!(false);
    let waiting = server.send("POST", "/v1/completions", &[], &whole.to_string());
    std::thread::sleep(Duration::from_millis(500));
    drop(waiting);
    assert_slot_freed(&server, "the abandoned whole answer");

    // SIGTERM while a request streams: it ends (finished, or cancelled after the grace with an
    // error event) with [DONE], and the server exits 0.
    let mut streaming = open_stream(&server, "/v1/completions", &long, "\"text\"");
    assert_eq!(server.terminate(), Some(0));
    let mut rest = String::new();
    let _ = streaming.read_to_string(&mut rest);
    assert!(rest.contains("data: [DONE]"), "{rest}");
    // 3000 tokens do not fit in the grace: the stream says it was cancelled.
    assert!(
        rest.contains(r#""code":"cancelled""#) || rest.contains(r#""finish_reason":"length""#),
        "{rest}"
    );
}

#[test]
fn concurrent_greedy_requests_answer_as_single_ones_without_growing_memory() {
    const THREADS: usize = 16;
    const PER_THREAD: usize = 8;
    const TOKENS: usize = 16;
    let server = Arc::new(Server::start(&["-c", "512"]));
    let prompts: Vec<String> = (0..THREADS)
        .map(|i| format!("Write one sentence about the number {i}."))
        .collect();
    // Each prompt alone, one at a time.
    let single: Vec<String> = prompts
        .iter()
        .map(|p| server.chat_text(p, TOKENS))
        .collect();
    assert!(single.iter().all(|t| !t.is_empty()));

    // All threads at once; thread t asks prompt (t + k) % THREADS on its k-th request.
    let round = |per_thread: usize| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let server = server.clone();
                let prompts = prompts.clone();
                std::thread::spawn(move || {
                    (0..per_thread)
                        .map(|k| {
                            let i = (t + k) % THREADS;
                            (i, server.chat_text(&prompts[i], TOKENS))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut answers = Vec::new();
        for h in handles {
            answers.extend(h.join().expect("client thread"));
        }
        answers
    };
    let warm = round(1);
    let rss_warm = server.rss_kib();
    let start = Instant::now();
    let answers = round(PER_THREAD);
    let secs = start.elapsed().as_secs_f64();
    let rss_after = server.rss_kib();
    assert_eq!(answers.len(), THREADS * PER_THREAD);
    for (i, text) in warm.iter().chain(&answers) {
        assert_eq!(text, &single[*i], "prompt {i} under load");
    }
    eprintln!(
        "{} requests in {secs:.1} s; RSS {rss_warm} KiB after the warm-up, {rss_after} KiB after",
        answers.len()
    );
    let grown = rss_after as f64 / rss_warm as f64;
    assert!(grown <= 1.05, "RSS grew from {rss_warm} to {rss_after} KiB");
    let server = Arc::try_unwrap(server).ok().expect("threads are done");
    assert_eq!(server.terminate(), Some(0));
}

/// A short chat is answered within 10 s: `what` no longer holds the server's only slot.
fn assert_slot_freed(server: &Server, what: &str) {
    let left = Instant::now();
    let r = server.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        left.elapsed() < Duration::from_secs(10),
        "{what} kept the slot for {:?}",
        left.elapsed()
    );
}
