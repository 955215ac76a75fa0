//! The request bodies of the OpenAI API, read field by field from JSON and checked.
//!
//! Every field lutra uses is type-checked with an error that names it; fields it does not use are
//! accepted and ignored (clients send many, such as `user` or `logprobs`).

use lutra_runtime::chat::Message;
use lutra_runtime::sampler::SamplerConfig;
use serde_json::{Map, Value};

use super::error::ApiError;

/// Stop strings a request may give at most (OpenAI's limit).
pub(crate) const MAX_STOPS: usize = 4;

/// How to generate: the fields `/v1/chat/completions` and `/v1/completions` share.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Params {
    pub sampler: SamplerConfig,
    /// `max_completion_tokens` or `max_tokens`; `None` generates until end of text or a full context.
    pub max_tokens: Option<usize>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Text-level stop strings, cut from the output.
    pub stop: Vec<String>,
    /// llama-server's `ignore_eos`: generate past end-of-generation tokens (end of text, end of
    /// turn) until `max_tokens` or a full context.
    pub ignore_eos: bool,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub include_usage: bool,
}

/// A `/v1/chat/completions` request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChatRequest {
    pub messages: Vec<Message>,
    pub params: Params,
}

/// The prompt of a `/v1/completions` request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Prompt {
    /// Text, tokenized with special-token text parsed (like `lutra generate -p`).
    Text(String),
    /// Token ids as given.
    Tokens(Vec<u32>),
}

/// A `/v1/completions` request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CompletionRequest {
    pub prompt: Prompt,
    pub params: Params,
}

/// A `/tokenize` request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TokenizeRequest {
    pub content: String,
    /// Put BOS first when the model uses one.
    pub add_special: bool,
    /// Answer `{id, piece}` objects instead of bare ids.
    pub with_pieces: bool,
}

/// Parses a request body as a JSON object.
pub(crate) fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}")))?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ApiError::invalid(format!(
            "the request body must be a JSON object, not {}",
            kind(&other)
        ))),
    }
}

/// Reads `/v1/chat/completions`.
pub(crate) fn chat_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let obj = object(body)?;
    let fields = Fields(&obj);
    let messages = match fields.get("messages") {
        None => return Err(ApiError::field("messages", "'messages' is required")),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(fields.wrong_type("messages", "an array", other)),
    };
    if messages.is_empty() {
        return Err(ApiError::field(
            "messages",
            "'messages' must hold at least one message",
        ));
    }
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ChatRequest {
        messages,
        params: params(&fields)?,
    })
}

/// Reads `/v1/completions`.
pub(crate) fn completion_request(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let obj = object(body)?;
    let fields = Fields(&obj);
    let prompt = match fields.get("prompt") {
        None => return Err(ApiError::field("prompt", "'prompt' is required")),
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Prompt::Text(s.clone()),
            [] => return Err(ApiError::field("prompt", "'prompt' is an empty array")),
            _ if items.iter().all(Value::is_number) => Prompt::Tokens(
                items
                    .iter()
                    .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| {
                        ApiError::field("prompt", "token ids in 'prompt' must be integers >= 0")
                    })?,
            ),
            _ if items.iter().all(Value::is_string) => {
                return Err(ApiError::field(
                    "prompt",
                    "lutra serves one prompt per request: 'prompt' must be a string or an array of one string",
                ))
            }
            _ => {
                return Err(ApiError::field(
                    "prompt",
                    "'prompt' must be a string, an array of one string, or an array of token ids",
                ))
            }
        },
        Some(other) => return Err(fields.wrong_type("prompt", "a string", other)),
    };
    Ok(CompletionRequest {
        prompt,
        params: params(&fields)?,
    })
}

/// Reads `/tokenize`.
pub(crate) fn tokenize_request(body: &[u8]) -> Result<TokenizeRequest, ApiError> {
    let obj = object(body)?;
    let fields = Fields(&obj);
    Ok(TokenizeRequest {
        content: fields
            .string("content")?
            .ok_or_else(|| ApiError::field("content", "'content' is required"))?
            .to_string(),
        add_special: fields.boolean("add_special")?.unwrap_or(false),
        with_pieces: fields.boolean("with_pieces")?.unwrap_or(false),
    })
}

/// Reads `/detokenize`: the token ids.
pub(crate) fn detokenize_request(body: &[u8]) -> Result<Vec<u32>, ApiError> {
    let obj = object(body)?;
    let fields = Fields(&obj);
    match fields.get("tokens") {
        None => Err(ApiError::field("tokens", "'tokens' is required")),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| ApiError::field("tokens", "'tokens' must be an array of integers >= 0")),
        Some(other) => Err(fields.wrong_type("tokens", "an array", other)),
    }
}

/// One chat message: `role` and `content` (a string, an array of text parts, or null).
fn message(i: usize, value: &Value) -> Result<Message, ApiError> {
    let at = format!("messages[{i}]");
    let Value::Object(obj) = value else {
        return Err(ApiError::field(
            at.clone(),
            format!("'{at}' must be an object, not {}", kind(value)),
        ));
    };
    let fields = Fields(obj);
    let role_at = format!("{at}.role");
    let role = match fields.get("role") {
        None => {
            return Err(ApiError::field(
                role_at.clone(),
                format!("'{role_at}' is required"),
            ))
        }
        Some(Value::String(r)) => r.as_str(),
        Some(other) => return Err(fields.wrong_type(&role_at, "a string", other)),
    };
    let role = match role {
        "system" | "user" | "assistant" => role,
        // OpenAI's newer name for the system message.
        "developer" => "system",
        other => {
            return Err(ApiError::field(
                role_at,
                format!(
                    "unknown role '{other}' in {at}: expected 'system', 'developer', 'user' or 'assistant'"
                ),
            ))
        }
    };
    let content_at = format!("{at}.content");
    // `get` reads null as absent; here null is a value (an assistant turn that only called tools).
    let content = match obj.get("content") {
        None => {
            return Err(ApiError::field(
                content_at.clone(),
                format!("'{content_at}' is required"),
            ))
        }
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) => String::new(),
        Some(Value::Array(parts)) => text_parts(&content_at, parts)?,
        Some(other) => {
            return Err(fields.wrong_type(&content_at, "a string or an array of parts", other))
        }
    };
    Ok(Message::new(role, &content))
}

/// The text of an array of content parts (`{"type":"text","text":...}`), joined by newlines.
fn text_parts(at: &str, parts: &[Value]) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let part_at = format!("{at}[{j}]");
        let Value::Object(obj) = part else {
            return Err(ApiError::field(
                part_at.clone(),
                format!("'{part_at}' must be an object, not {}", kind(part)),
            ));
        };
        let fields = Fields(obj);
        match fields.get("type") {
            Some(Value::String(t)) if t == "text" => {}
            Some(Value::String(t)) => {
                return Err(ApiError::field(
                    format!("{part_at}.type"),
                    format!(
                        "content parts of type '{t}' are not supported: lutra serves text only"
                    ),
                ))
            }
            _ => {
                return Err(ApiError::field(
                    format!("{part_at}.type"),
                    format!("'{part_at}.type' must be \"text\""),
                ))
            }
        }
        match fields.get("text") {
            Some(Value::String(s)) => texts.push(s.as_str()),
            Some(other) => {
                return Err(fields.wrong_type(&format!("{part_at}.text"), "a string", other))
            }
            None => {
                return Err(ApiError::field(
                    format!("{part_at}.text"),
                    format!("'{part_at}.text' is required"),
                ))
            }
        }
    }
    Ok(texts.join("\n"))
}

/// The generation fields, checked; defaults from [`SamplerConfig::default`] (llama-server's).
fn params(fields: &Fields<'_>) -> Result<Params, ApiError> {
    let mut sampler = SamplerConfig::default();
    if let Some(t) = fields.number("temperature")? {
        if t < 0.0 {
            return Err(ApiError::field(
                "temperature",
                format!("'temperature' must be at least 0, not {t}"),
            ));
        }
        sampler.temperature = t as f32;
    }
    if let Some(p) = fields.number("top_p")? {
        if !(0.0..=1.0).contains(&p) {
            return Err(ApiError::field(
                "top_p",
                format!("'top_p' must be between 0 and 1, not {p}"),
            ));
        }
        sampler.top_p = p as f32;
    }
    if let Some(p) = fields.number("min_p")? {
        if !(0.0..=1.0).contains(&p) {
            return Err(ApiError::field(
                "min_p",
                format!("'min_p' must be between 0 and 1, not {p}"),
            ));
        }
        sampler.min_p = p as f32;
    }
    if let Some(k) = fields.integer("top_k")? {
        // llama-server reads top_k <= 0 as "all tokens".
        sampler.top_k = usize::try_from(k).unwrap_or(0);
    }
    if let Some(r) = fields.number("repeat_penalty")? {
        if r <= 0.0 {
            return Err(ApiError::field(
                "repeat_penalty",
                format!("'repeat_penalty' must be above 0, not {r}"),
            ));
        }
        sampler.repeat_penalty = r as f32;
    }
    if let Some(n) = fields.integer("repeat_last_n")? {
        sampler.repeat_last_n = usize::try_from(n)
            .map_err(|_| ApiError::field("repeat_last_n", "'repeat_last_n' must be at least 0"))?;
    }
    if let Some(seed) = fields.integer("seed")? {
        // -1 is llama-server's "random seed".
        sampler.seed = match seed {
            -1 => None,
            s => Some(u64::try_from(s).map_err(|_| {
                ApiError::field(
                    "seed",
                    format!("'seed' must be at least 0 (or -1 for random), not {s}"),
                )
            })?),
        };
    }
    let penalty = |name: &str| -> Result<f32, ApiError> {
        match fields.number(name)? {
            Some(p) if !(-2.0..=2.0).contains(&p) => Err(ApiError::field(
                name,
                format!("'{name}' must be between -2 and 2, not {p}"),
            )),
            Some(p) => Ok(p as f32),
            None => Ok(0.0),
        }
    };
    let presence_penalty = penalty("presence_penalty")?;
    let frequency_penalty = penalty("frequency_penalty")?;
    let max_tokens = match fields.integer("max_completion_tokens")? {
        Some(n) => Some(("max_completion_tokens", n)),
        None => fields.integer("max_tokens")?.map(|n| ("max_tokens", n)),
    };
    let max_tokens = match max_tokens {
        Some((name, n)) if n < 1 => {
            return Err(ApiError::field(
                name,
                format!("'{name}' must be at least 1, not {n}"),
            ))
        }
        Some((_, n)) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        None => None,
    };
    if let Some(n) = fields.integer("n")? {
        if n != 1 {
            return Err(ApiError::field(
                "n",
                format!("lutra generates one choice per request: 'n' must be 1, not {n}"),
            ));
        }
    }
    let stop = match fields.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOPS {
                return Err(ApiError::field(
                    "stop",
                    format!(
                        "'stop' holds at most {MAX_STOPS} strings, not {}",
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ApiError::field("stop", "'stop' must be a string or an array of strings")
                })?
        }
        Some(other) => {
            return Err(fields.wrong_type("stop", "a string or an array of strings", other))
        }
    };
    let ignore_eos = fields.boolean("ignore_eos")?.unwrap_or(false);
    let stream = fields.boolean("stream")?.unwrap_or(false);
    let include_usage = match fields.get("stream_options") {
        None => false,
        Some(Value::Object(opts)) => match opts.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(fields.wrong_type("stream_options.include_usage", "a boolean", other))
            }
        },
        Some(other) => return Err(fields.wrong_type("stream_options", "an object", other)),
    };
    Ok(Params {
        sampler,
        max_tokens,
        presence_penalty,
        frequency_penalty,
        stop,
        ignore_eos,
        stream,
        include_usage,
    })
}

/// The fields of a JSON object, read with type errors that name the field. A null field counts as
/// absent.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn wrong_type(&self, name: &str, expected: &str, found: &Value) -> ApiError {
        ApiError::field(
            name,
            format!("'{name}' must be {expected}, not {}", kind(found)),
        )
    }

    fn number(&self, name: &str) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(self.wrong_type(name, "a number", other)),
        }
    }

    fn integer(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) => Ok(Some(i)),
                // Integers beyond i64 saturate; fractions are wrong.
                None if n.as_u64().is_some() => Ok(Some(i64::MAX)),
                None => Err(ApiError::field(
                    name,
                    format!("'{name}' must be an integer, not {n}"),
                )),
            },
            Some(other) => Err(self.wrong_type(name, "an integer", other)),
        }
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong_type(name, "a boolean", other)),
        }
    }

    fn string(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(name, "a string", other)),
        }
    }
}

/// A JSON value's kind, for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ChatRequest, ApiError> {
        chat_request(body.as_bytes())
    }

    fn param_of(err: ApiError) -> String {
        assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST, "{err:?}");
        err.param.unwrap_or_default()
    }

    #[test]
    fn a_minimal_chat_takes_the_default_sampler() {
        let r = chat(r#"{"model":"x","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(r.messages, [Message::new("user", "hi")]);
        assert_eq!(r.params.sampler, SamplerConfig::default());
        assert_eq!(r.params.max_tokens, None);
        assert!(!r.params.stream && !r.params.include_usage && !r.params.ignore_eos);
        assert!(r.params.stop.is_empty());
    }

    #[test]
    fn every_parameter_is_read() {
        let r = chat(
            r#"{"messages":[{"role":"developer","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
                {"role":"assistant","content":null}],
               "temperature":0,"top_p":0.5,"top_k":7,"min_p":0.1,"max_tokens":9,"stop":["x","y"],
               "seed":42,"presence_penalty":0.5,"frequency_penalty":-1,"repeat_penalty":1.1,
               "stream":true,"stream_options":{"include_usage":true},"user":"ignored","logprobs":false}"#,
        )
        .unwrap();
        assert_eq!(
            r.messages,
            [
                Message::new("system", "be brief"),
                Message::new("user", "a\nb"),
                Message::new("assistant", "")
            ]
        );
        let p = &r.params;
        assert_eq!(p.sampler.temperature, 0.0);
        assert_eq!(
            (p.sampler.top_p, p.sampler.top_k, p.sampler.min_p),
            (0.5, 7, 0.1)
        );
        assert_eq!((p.sampler.seed, p.sampler.repeat_penalty), (Some(42), 1.1));
        assert_eq!((p.presence_penalty, p.frequency_penalty), (0.5, -1.0));
        assert_eq!(p.max_tokens, Some(9));
        assert_eq!(p.stop, ["x", "y"]);
        assert!(p.stream && p.include_usage);
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let r = chat(r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":5,"max_completion_tokens":3}"#)
            .unwrap();
        assert_eq!(r.params.max_tokens, Some(3));
        let r = chat(r#"{"messages":[{"role":"user","content":"hi"}],"stop":"END","seed":-1}"#)
            .unwrap();
        assert_eq!(r.params.stop, ["END"]);
        assert_eq!(r.params.sampler.seed, None);
    }

    #[test]
    fn wrong_types_name_the_field() {
        let m = r#""messages":[{"role":"user","content":"hi"}]"#;
        for (extra, field) in [
            (r#""temperature":"hot""#, "temperature"),
            (r#""max_tokens":"9""#, "max_tokens"),
            (r#""max_tokens":2.5"#, "max_tokens"),
            (r#""top_k":true"#, "top_k"),
            (r#""stream":"yes""#, "stream"),
            (r#""stop":5"#, "stop"),
            (r#""stop":["a",1]"#, "stop"),
            (
                r#""stream_options":{"include_usage":1}"#,
                "stream_options.include_usage",
            ),
            (r#""seed":"1""#, "seed"),
        ] {
            let err = chat(&format!("{{{m},{extra}}}")).unwrap_err();
            assert!(err.message.contains(field), "{extra}: {}", err.message);
            assert_eq!(param_of(err), field, "{extra}");
        }
        let err = chat(r#"{"messages":[{"role":"user","content":5}]}"#).unwrap_err();
        assert_eq!(param_of(err), "messages[0].content");
        let err = chat(r#"{"messages":{"role":"user"}}"#).unwrap_err();
        assert_eq!(param_of(err), "messages");
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        let m = r#""messages":[{"role":"user","content":"hi"}]"#;
        for (extra, field) in [
            (r#""temperature":-0.1"#, "temperature"),
            (r#""max_tokens":0"#, "max_tokens"),
            (r#""max_completion_tokens":-3"#, "max_completion_tokens"),
            (r#""top_p":1.5"#, "top_p"),
            (r#""min_p":-1"#, "min_p"),
            (r#""presence_penalty":3"#, "presence_penalty"),
            (r#""repeat_penalty":0"#, "repeat_penalty"),
            (r#""n":2"#, "n"),
            (r#""seed":-2"#, "seed"),
            (r#""stop":["a","b","c","d","e"]"#, "stop"),
        ] {
            let err = chat(&format!("{{{m},{extra}}}")).unwrap_err();
            assert_eq!(param_of(err), field, "{extra}");
        }
    }

    #[test]
    fn bad_messages_are_rejected() {
        for (body, field) in [
            (r#"{"messages":[]}"#, "messages"),
            (r#"{"model":"x"}"#, "messages"),
            (
                r#"{"messages":[{"role":"wizard","content":"hi"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"messages":[{"role":"user","content":"a"},{"content":"b"}]}"#,
                "messages[1].role",
            ),
            (r#"{"messages":[{"role":"user"}]}"#, "messages[0].content"),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
                "messages[0].content[0].type",
            ),
            (r#"{"messages":["hi"]}"#, "messages[0]"),
        ] {
            assert_eq!(param_of(chat(body).unwrap_err()), field, "{body}");
        }
    }

    #[test]
    fn bad_json_is_a_400_without_a_field() {
        for body in ["{", "[1,2]", "", "null"] {
            let err = chat(body).unwrap_err();
            assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
            assert_eq!(err.param, None, "{body}");
        }
    }

    #[test]
    fn completion_prompts() {
        let p = |body: &str| completion_request(body.as_bytes()).map(|r| r.prompt);
        assert_eq!(
            p(r#"{"prompt":"abc"}"#).unwrap(),
            Prompt::Text("abc".into())
        );
        assert_eq!(
            p(r#"{"prompt":["abc"]}"#).unwrap(),
            Prompt::Text("abc".into())
        );
        assert_eq!(
            p(r#"{"prompt":[1,2,3]}"#).unwrap(),
            Prompt::Tokens(vec![1, 2, 3])
        );
        for bad in [
            r#"{"prompt":["a","b"]}"#,
            r#"{"prompt":[]}"#,
            r#"{"prompt":[1,-2]}"#,
            r#"{"prompt":7}"#,
            r#"{}"#,
        ] {
            assert_eq!(param_of(p(bad).unwrap_err()), "prompt", "{bad}");
        }
    }

    #[test]
    fn tokenize_and_detokenize_bodies() {
        let t = tokenize_request(br#"{"content":"hi","with_pieces":true}"#).unwrap();
        assert_eq!(
            (t.content.as_str(), t.add_special, t.with_pieces),
            ("hi", false, true)
        );
        assert_eq!(
            param_of(tokenize_request(br#"{"content":1}"#).unwrap_err()),
            "content"
        );
        assert_eq!(detokenize_request(br#"{"tokens":[5,6]}"#).unwrap(), [5, 6]);
        assert_eq!(
            param_of(detokenize_request(br#"{"tokens":["a"]}"#).unwrap_err()),
            "tokens"
        );
    }
}
