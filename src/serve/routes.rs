//! The endpoints: OpenAI's `/v1/chat/completions`, `/v1/completions` and `/v1/models`, and
//! llama-server's `/health`, `/tokenize` and `/detokenize`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lutra_runtime::session::chat_prompt;
use serde_json::{json, Value};

use super::api::{self, Params, Prompt};
use super::error::ApiError;
use super::generation::{engine_request, Finish, FinishReason, Generation, Usage};
use super::AppState;

/// Largest request body accepted (413 beyond).
pub(crate) const BODY_LIMIT: usize = 4 << 20;

/// The server's routes. `/health` answers without the API key.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let guarded = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        .merge(guarded)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Rejects requests without `Authorization: Bearer KEY` when the server has a key.
async fn require_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if given != Some(key.as_str()) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_id,
            "object": "model",
            "created": state.started,
            "owned_by": "lutra",
            "meta": {"n_ctx": state.engine.model().context_length()},
        }],
    }))
}

/// The body's bytes; a body over [`BODY_LIMIT`] is a 413 in the API's error shape.
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "the request body is larger than the limit of {} MiB",
                BODY_LIMIT >> 20
            ),
            param: None,
            code: Some("request_too_large"),
        },
        _ => ApiError::invalid(format!("cannot read the request body: {rejection}")),
    })
}

/// The model's tokenizer, or a 400 for a model without one.
fn tokenizer(state: &AppState) -> Result<&lutra_runtime::tokenizer::Tokenizer, ApiError> {
    state
        .engine
        .model()
        .tokenizer()
        .ok_or_else(|| ApiError::invalid("this model has no tokenizer"))
}

/// A prompt refused as too long for the context is the fault of the field `param`.
fn blame(e: impl Into<ApiError>, param: &str) -> ApiError {
    let e = e.into();
    if e.code == Some("context_length_exceeded") {
        ApiError {
            param: Some(param.into()),
            ..e
        }
    } else {
        e
    }
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = api::chat_request(&body_bytes(body)?)?;
    let model = state.engine.model();
    let prompt = chat_prompt(model, &request.messages)?;
    let engine_request = engine_request(
        prompt.tokens,
        &request.params,
        prompt.end_of_turn,
        model.context_length(),
    );
    let generation = Generation::start(&state.engine, engine_request, request.params.stop.clone())
        .map_err(|e| blame(e, "messages"))?;
    respond(&state, Kind::Chat, generation, &request.params).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = api::completion_request(&body_bytes(body)?)?;
    let tokens = match request.prompt {
        Prompt::Text(text) => tokenizer(&state)?
            .encode(&text, true)
            .map_err(|e| blame(e, "prompt"))?,
        Prompt::Tokens(tokens) => tokens,
    };
    let model = state.engine.model();
    let engine_request = engine_request(tokens, &request.params, None, model.context_length());
    let generation = Generation::start(&state.engine, engine_request, request.params.stop.clone())
        .map_err(|e| blame(e, "prompt"))?;
    respond(&state, Kind::Text, generation, &request.params).await
}

async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let request = api::tokenize_request(&body_bytes(body)?)?;
    let tok = tokenizer(&state)?;
    let mut ids = tok.encode(&request.content, true)?;
    if !request.add_special {
        // The special tokens the tokenizer adds around every text are those of an empty text.
        let added = tok.encode("", true)?;
        let bos = tok.bos_id().filter(|b| added.first() == Some(b));
        let eos = tok
            .eos_id()
            .filter(|e| added.last() == Some(e) && added.len() > usize::from(bos.is_some()));
        if bos.is_some() && ids.first() == bos.as_ref() {
            ids.remove(0);
        }
        if eos.is_some() && ids.last() == eos.as_ref() {
            ids.pop();
        }
    }
    let tokens: Vec<Value> = if request.with_pieces {
        ids.iter()
            .map(|&id| {
                let bytes = tok.token_bytes(id);
                // A piece that is not valid UTF-8 on its own (part of a character) is given as bytes.
                let piece = match std::str::from_utf8(bytes) {
                    Ok(s) => json!(s),
                    Err(_) => json!(bytes),
                };
                json!({"id": id, "piece": piece})
            })
            .collect()
    } else {
        ids.iter().map(|&id| json!(id)).collect()
    };
    Ok(Json(json!({ "tokens": tokens })))
}

async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let ids = api::detokenize_request(&body_bytes(body)?)?;
    let content = tokenizer(&state)?
        .decode(&ids, false)
        .map_err(|e| ApiError::field("tokens", e.to_string()))?;
    Ok(Json(json!({ "content": content })))
}

/// Which OpenAI object family a response belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `chat.completion` / `chat.completion.chunk`.
    Chat,
    /// `text_completion`.
    Text,
}

/// The identity every object of one response shares.
struct Header {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Header {
    fn new(state: &AppState, kind: Kind) -> Header {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        };
        let n = state.next_id.fetch_add(1, Ordering::Relaxed);
        Header {
            kind,
            id: format!("{prefix}-{:x}{n:06x}", state.started),
            created: super::unix_time(),
            model: state.model_id.clone(),
        }
    }

    /// An object with `choices` and optional `usage`.
    fn object(&self, streamed: bool, choices: Value, usage: Option<Usage>) -> Value {
        let object = match (self.kind, streamed) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        };
        let mut value = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            value["usage"] = usage_json(u);
        }
        value
    }

    /// The single choice of a complete answer.
    fn complete(&self, text: String, reason: FinishReason, usage: Usage) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": reason.as_str(),
            }),
            Kind::Text => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": reason.as_str(),
            }),
        };
        self.object(false, json!([choice]), Some(usage))
    }

    /// A streamed chunk: text (with the role first for chat) and maybe the finish reason.
    fn chunk(&self, delta: Option<&str>, first: bool, reason: Option<FinishReason>) -> Value {
        let reason = reason.map(FinishReason::as_str);
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match (first, delta) {
                    (true, _) => json!({"role": "assistant", "content": ""}),
                    (false, Some(text)) => json!({"content": text}),
                    (false, None) => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason})
            }
            Kind::Text => json!({
                "index": 0,
                "text": delta.unwrap_or(""),
                "logprobs": null,
                "finish_reason": reason,
            }),
        };
        self.object(true, json!([choice]), None)
    }
}

fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// Answers with the whole completion, or streams it as server-sent events.
async fn respond(
    state: &AppState,
    kind: Kind,
    generation: Generation,
    params: &Params,
) -> Result<Response, ApiError> {
    let header = Header::new(state, kind);
    if !params.stream {
        let (text, reason, usage) = generation.collect().await?;
        return Ok(Json(header.complete(text, reason, usage)).into_response());
    }
    let stream = EventStream {
        header,
        generation,
        include_usage: params.include_usage,
        phase: Phase::Start,
    };
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        s.next_frame()
            .await
            .map(|frame| (Ok::<_, Infallible>(frame), s))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// Where a streamed response is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing sent yet.
    Start,
    /// Text is streaming.
    Running,
    /// `[DONE]` was sent.
    Done,
}

/// The server-sent events of one streamed response.
struct EventStream {
    header: Header,
    generation: Generation,
    include_usage: bool,
    phase: Phase,
}

impl EventStream {
    /// The next frames to send (one or more `data:` events), or `None` at the end.
    async fn next_frame(&mut self) -> Option<Bytes> {
        match self.phase {
            Phase::Done => None,
            Phase::Start => {
                self.phase = Phase::Running;
                Some(match self.header.kind {
                    Kind::Chat => sse(&self.header.chunk(None, true, None)),
                    // A text completion has no role chunk: the first event carries text.
                    Kind::Text => self.next_text().await,
                })
            }
            Phase::Running => Some(self.next_text().await),
        }
    }

    /// Frames for the next step of the generation (skipping steps that release no text).
    async fn next_text(&mut self) -> Bytes {
        let mut out = Vec::new();
        loop {
            let Some(step) = self.generation.next().await else {
                // Not reached: the finishing step sets Phase::Done.
                self.phase = Phase::Done;
                out.extend_from_slice(b"data: [DONE]\n\n");
                return out.into();
            };
            if !step.text.is_empty() {
                out.extend_from_slice(&sse(&self.header.chunk(Some(&step.text), false, None)));
            }
            match step.finish {
                None if out.is_empty() => continue,
                None => return out.into(),
                Some(Finish::Done { reason, usage }) => {
                    out.extend_from_slice(&sse(&self.header.chunk(None, false, Some(reason))));
                    if self.include_usage {
                        let usage_chunk = self.header.object(true, json!([]), Some(usage));
                        out.extend_from_slice(&sse(&usage_chunk));
                    }
                }
                Some(Finish::Error(e)) => out.extend_from_slice(&sse(&e.body())),
            }
            out.extend_from_slice(b"data: [DONE]\n\n");
            self.phase = Phase::Done;
            return out.into();
        }
    }
}

/// One server-sent event carrying `value` as JSON.
fn sse(value: &Value) -> Bytes {
    format!("data: {value}\n\n").into()
}
