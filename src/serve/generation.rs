//! One request's generation as the HTTP layer sees it: submitted to the engine, its events read from
//! a channel, stop strings applied, and the end described as an OpenAI finish reason and usage.

use lutra_runtime::generate::{CancelToken, GenerateOptions, StopReason};
use tokio::sync::mpsc;

use super::api::Params;
use super::error::ApiError;
use super::stop::StopMatcher;
use lutra_runtime::engine::{Engine, Event, Request};

/// Why a completion ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FinishReason {
    /// End of text, end of turn, or a stop string.
    Stop,
    /// `max_tokens` reached or the context is full.
    Length,
}

impl FinishReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// How a generation ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Finish {
    /// It completed.
    Done { reason: FinishReason, usage: Usage },
    /// It failed or was cancelled by the server.
    Error(ApiError),
}

/// What one engine event gives the client: text (possibly empty), then, once, how it ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Step {
    pub text: String,
    pub finish: Option<Finish>,
}

/// The engine request for a prompt and the request's parameters.
pub(crate) fn engine_request(
    prompt: Vec<u32>,
    params: &Params,
    end_of_turn: Option<u32>,
    context: usize,
) -> Request {
    let options = GenerateOptions {
        // Without a limit, generation runs until end of text or a full context.
        max_tokens: params.max_tokens.unwrap_or(context),
        sampler: params.sampler.clone(),
        parse_special: false,
        stop_at_eos: !params.ignore_eos,
    };
    let mut request = Request::new(prompt, options);
    request.presence_penalty = params.presence_penalty;
    request.frequency_penalty = params.frequency_penalty;
    request.stop_tokens = end_of_turn.into_iter().collect();
    request
}

/// A running request. Dropping it (the client went away) cancels the generation.
pub(crate) struct Generation {
    events: mpsc::UnboundedReceiver<Event>,
    cancel: CancelToken,
    stop: StopMatcher,
    prompt_tokens: usize,
    /// Pieces received so far.
    pieces: usize,
    finished: bool,
}

impl Generation {
    /// Submits `request`; its events go through an unbounded channel (the engine's callback must not
    /// block), and a closed channel cancels it.
    pub(crate) fn start(
        engine: &Engine,
        request: Request,
        stops: Vec<String>,
    ) -> Result<Generation, ApiError> {
        let prompt_tokens = request.prompt.len();
        let (tx, events) = mpsc::unbounded_channel();
        let cancel = engine.submit_with(request, Box::new(move |event| tx.send(event).is_ok()))?;
        Ok(Generation {
            events,
            cancel,
            stop: StopMatcher::new(stops),
            prompt_tokens,
            pieces: 0,
            finished: false,
        })
    }

    /// The next step; `None` after the one that finished.
    pub(crate) async fn next(&mut self) -> Option<Step> {
        if self.finished {
            return None;
        }
        let step = match self.events.recv().await {
            Some(Event::Piece(piece)) => {
                self.pieces += 1;
                let released = self.stop.push(&piece.text);
                let finish = released.stopped.then(|| {
                    // The rest of the generation is not wanted.
                    self.cancel.cancel();
                    Finish::Done {
                        reason: FinishReason::Stop,
                        usage: Usage {
                            prompt_tokens: self.prompt_tokens,
                            completion_tokens: self.pieces,
                        },
                    }
                });
                Step {
                    text: released.text,
                    finish,
                }
            }
            Some(Event::Done(done)) => {
                let usage = Usage {
                    prompt_tokens: done.prompt_tokens,
                    completion_tokens: done.generated_tokens,
                };
                let finish = match done.stop {
                    StopReason::EndOfGeneration => Finish::Done {
                        reason: FinishReason::Stop,
                        usage,
                    },
                    StopReason::MaxTokens | StopReason::ContextFull => Finish::Done {
                        reason: FinishReason::Length,
                        usage,
                    },
                    StopReason::Cancelled => Finish::Error(ApiError {
                        status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        message: "the request was cancelled: the server is shutting down".into(),
                        param: None,
                        code: Some("cancelled"),
                    }),
                    StopReason::Failed => Finish::Error(ApiError::internal(format!(
                        "generation failed: {}",
                        done.error.as_deref().unwrap_or("unknown error")
                    ))),
                };
                Step {
                    text: self.stop.finish(),
                    finish: Some(finish),
                }
            }
            None => Step {
                text: String::new(),
                finish: Some(Finish::Error(ApiError::internal(
                    "the engine ended the request without finishing it",
                ))),
            },
        };
        self.finished = step.finish.is_some();
        Some(step)
    }

    /// Runs to the end: the whole text and how it ended, or the error.
    pub(crate) async fn collect(mut self) -> Result<(String, FinishReason, Usage), ApiError> {
        let mut text = String::new();
        while let Some(step) = self.next().await {
            text.push_str(&step.text);
            match step.finish {
                None => {}
                Some(Finish::Done { reason, usage }) => return Ok((text, reason, usage)),
                Some(Finish::Error(e)) => return Err(e),
            }
        }
        Err(ApiError::internal("the generation ended twice"))
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.finished {
            self.cancel.cancel();
        }
    }
}
