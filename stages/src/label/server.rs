//! The labelling server behind `rlhf label`: one page (HTML, JS and CSS compiled in, no
//! external assets) and a small JSON API, on 127.0.0.1 only. One thread serves every
//! labeller; each label is appended and fsynced before the answer goes back.
//!
//! Model outputs are untrusted: the API escapes `<`, `>` and `&` inside JSON strings, the
//! page sets text with `textContent` only, and every response carries a
//! Content-Security-Policy that allows no inline script and no images at all.

use super::items::Item;
use super::log::{
    agreement, now_ms, preference_of_a, Event, LabelEvent, LabelLog, Side, UndoEvent,
};
use super::LabelError;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Read;
use tiny_http::{Header, Method, Request, Response, Server};

const PAGE_HTML: &str = include_str!("page.html");
const PAGE_JS: &str = include_str!("page.js");
const PAGE_CSS: &str = include_str!("page.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'none'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'";
const MAX_BODY: u64 = 64 * 1024;

/// What one server labels.
pub struct LabelServer {
    items: Vec<Item>,
    log: LabelLog,
    labels_per_item: usize,
    /// Per labeller: items skipped this session (offered again once nothing else is left).
    skipped: BTreeMap<String, Vec<String>>,
    /// Per labeller: the item an undo gave back, offered next.
    reopened: BTreeMap<String, String>,
    announced_complete: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateRequest {
    labeller: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelRequest {
    labeller: String,
    item: String,
    choice: u8,
    a_is: Side,
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SkipRequest {
    labeller: String,
    item: String,
}

/// An API error: the status code and a message for the page.
struct Refusal(u16, String);

impl LabelServer {
    pub fn new(items: Vec<Item>, log: LabelLog, labels_per_item: usize) -> Self {
        LabelServer {
            items,
            log,
            labels_per_item: labels_per_item.max(1),
            skipped: BTreeMap::new(),
            reopened: BTreeMap::new(),
            announced_complete: false,
        }
    }

    /// Binds 127.0.0.1:`port` (0 picks a free port) and returns the server and its port.
    pub fn bind(port: u16) -> Result<(Server, u16), LabelError> {
        let address = format!("127.0.0.1:{port}");
        let server = Server::http(&address).map_err(|e| LabelError::Serve {
            address: address.clone(),
            message: e.to_string(),
        })?;
        let bound = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .unwrap_or(port);
        Ok((server, bound))
    }

    /// Serves requests until the process is stopped (Ctrl-C loses nothing: every label is
    /// already on disk).
    pub fn serve(&mut self, server: &Server, port: u16) -> Result<(), LabelError> {
        loop {
            let request = server.recv().map_err(|e| LabelError::Serve {
                address: format!("127.0.0.1:{port}"),
                message: e.to_string(),
            })?;
            self.handle(request, port);
        }
    }

    fn handle(&mut self, mut request: Request, port: u16) {
        let host_ok = request.headers().iter().any(|h| {
            h.field.equiv("Host")
                && [format!("127.0.0.1:{port}"), format!("localhost:{port}")]
                    .contains(&h.value.as_str().to_string())
        });
        let url = request.url().split('?').next().unwrap_or("").to_string();
        let method = request.method().clone();
        let response = if !host_ok {
            // Another Host means another site reached us through DNS rebinding.
            text_response(421, "text/plain; charset=utf-8", "wrong Host header".into())
        } else {
            match (&method, url.as_str()) {
                (Method::Get, "/" | "/index.html") => {
                    text_response(200, "text/html; charset=utf-8", PAGE_HTML.into())
                }
                (Method::Get, "/page.js") => {
                    text_response(200, "text/javascript; charset=utf-8", PAGE_JS.into())
                }
                (Method::Get, "/page.css") => {
                    text_response(200, "text/css; charset=utf-8", PAGE_CSS.into())
                }
                (Method::Get, "/api/agreement") => json_response(200, &self.agreement_json()),
                (Method::Post, path) if path.starts_with("/api/") => {
                    let result = read_json_body(&mut request).and_then(|body| self.api(path, body));
                    match result {
                        Ok(value) => json_response(200, &value),
                        Err(Refusal(code, message)) => {
                            json_response(code, &json!({ "error": message }))
                        }
                    }
                }
                _ => text_response(404, "text/plain; charset=utf-8", "not found".into()),
            }
        };
        let _ = request.respond(response);
    }

    fn api(&mut self, path: &str, body: Value) -> Result<Value, Refusal> {
        let bad = |e: serde_json::Error| Refusal(400, format!("bad request: {e}"));
        let labeller = match path {
            "/api/state" => {
                serde_json::from_value::<StateRequest>(body)
                    .map_err(bad)?
                    .labeller
            }
            "/api/label" => {
                let label: LabelRequest = serde_json::from_value(body).map_err(bad)?;
                let name = label.labeller.clone();
                self.label(label)?;
                name
            }
            "/api/undo" => {
                let name = serde_json::from_value::<StateRequest>(body)
                    .map_err(bad)?
                    .labeller;
                self.undo(&name)?;
                name
            }
            "/api/skip" => {
                let skip: SkipRequest = serde_json::from_value(body).map_err(bad)?;
                check_name(&skip.labeller)?;
                self.skipped
                    .entry(skip.labeller.clone())
                    .or_default()
                    .push(skip.item);
                skip.labeller
            }
            _ => return Err(Refusal(404, format!("no API `{path}`"))),
        };
        check_name(&labeller)?;
        Ok(self.state_json(&labeller))
    }

    fn label(&mut self, label: LabelRequest) -> Result<(), Refusal> {
        check_name(&label.labeller)?;
        let item = self
            .items
            .iter()
            .find(|i| i.id == label.item)
            .ok_or_else(|| Refusal(404, format!("no item `{}`", label.item)))?;
        let shown = a_side(&item.id, &label.labeller);
        if shown != label.a_is {
            return Err(Refusal(
                409,
                "the page showed another side order; reload it".into(),
            ));
        }
        let of_a = preference_of_a(label.choice)
            .ok_or_else(|| Refusal(400, format!("choice {} is not 1..5", label.choice)))?;
        let preference = if shown == Side::First { of_a } else { -of_a };
        let comment = label
            .comment
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty());
        let event = LabelEvent {
            item: item.id.clone(),
            labeller: label.labeller.clone(),
            choice: label.choice,
            a_is: shown,
            preference,
            comment,
            unix_ms: now_ms(),
        };
        self.log
            .append(Event::Label(event))
            .map_err(|e| Refusal(500, format!("could not save the label: {e}")))?;
        self.reopened.remove(&label.labeller);
        self.report_progress(&label.labeller);
        Ok(())
    }

    fn undo(&mut self, labeller: &str) -> Result<(), Refusal> {
        check_name(labeller)?;
        let Some(last) = self.log.state.last_of(labeller).map(|l| l.item.clone()) else {
            return Err(Refusal(409, "nothing to undo".into()));
        };
        let event = UndoEvent {
            item: last.clone(),
            labeller: labeller.to_string(),
            unix_ms: now_ms(),
        };
        self.log
            .append(Event::Undo(event))
            .map_err(|e| Refusal(500, format!("could not save the undo: {e}")))?;
        eprintln!("{labeller} undid the label of {last}");
        self.reopened.insert(labeller.to_string(), last);
        Ok(())
    }

    /// Items with all the labels they need.
    fn complete(&self) -> usize {
        let standing = self.log.state.standing();
        self.items
            .iter()
            .filter(|i| standing.get(i.id.as_str()).map_or(0, |l| l.len()) >= self.labels_per_item)
            .count()
    }

    /// The next item for `labeller`: one reopened by undo, else the first not yet labelled by
    /// them that still needs labels, else any they have not labelled (more overlap, better
    /// agreement figures); skipped items come last.
    fn next_item(&mut self, labeller: &str) -> Option<&Item> {
        let state = &self.log.state;
        let mine = state.labelled_by(labeller);
        let standing = state.standing();
        let open: Vec<usize> = (0..self.items.len())
            .filter(|&i| !mine.contains(self.items[i].id.as_str()))
            .collect();
        if let Some(reopened) = self.reopened.get(labeller) {
            if let Some(&i) = open.iter().find(|&&i| &self.items[i].id == reopened) {
                return self.items.get(i);
            }
        }
        let skipped = self.skipped.get(labeller).cloned().unwrap_or_default();
        let needs = |i: usize| {
            standing
                .get(self.items[i].id.as_str())
                .map_or(0, |l| l.len())
                < self.labels_per_item
        };
        let rank = |i: usize| (skipped.contains(&self.items[i].id), !needs(i), i);
        let best = open.iter().copied().min_by_key(|&i| rank(i));
        best.and_then(|i| self.items.get(i))
    }

    fn state_json(&mut self, labeller: &str) -> Value {
        let total = self.items.len();
        let complete = self.complete();
        let can_undo = self.log.state.last_of(labeller).is_some();
        let mine = {
            let labelled = self.log.state.labelled_by(labeller);
            self.items
                .iter()
                .filter(|i| labelled.contains(i.id.as_str()))
                .count()
        };
        let item = self.next_item(labeller).map(|item| {
            let a_is = a_side(&item.id, labeller);
            let (a, b) = match a_is {
                Side::First => (&item.first, &item.second),
                Side::Second => (&item.second, &item.first),
            };
            json!({ "id": item.id, "prompt": item.prompt, "a": a, "b": b, "a_is": a_is })
        });
        json!({
            "labeller": labeller,
            "item": item,
            "progress": { "mine": mine, "total": total, "complete": complete, "labels_per_item": self.labels_per_item },
            "can_undo": can_undo,
            "agreement": agreement(&self.log.state),
        })
    }

    fn agreement_json(&self) -> Value {
        let standing = self.log.state.standing();
        let per_labeller: BTreeMap<&str, usize> = self
            .log
            .state
            .labellers()
            .into_iter()
            .map(|n| (n, self.log.state.labelled_by(n).len()))
            .collect();
        json!({
            "agreement": agreement(&self.log.state),
            "labellers": per_labeller,
            "items": self.items.len(),
            "labelled_items": self.items.iter().filter(|i| standing.contains_key(i.id.as_str())).count(),
            "complete": self.complete(),
        })
    }

    fn report_progress(&mut self, labeller: &str) {
        let complete = self.complete();
        let a = agreement(&self.log.state);
        let agreement_text = a
            .direction
            .map(|d| format!("; agreement {:.2} over {} comparisons", d, a.comparisons))
            .unwrap_or_default();
        eprintln!(
            "{labeller}: {} labelled; {complete} of {} pairs complete{agreement_text}",
            self.log.state.labelled_by(labeller).len(),
            self.items.len()
        );
        if complete == self.items.len() && !self.announced_complete {
            self.announced_complete = true;
            eprintln!("every pair has its labels — rerun `rlhf run` on the pipeline to continue (labels in {})", self.log.path().display());
        }
    }
}

/// The side order a labeller sees for an item: pseudo-random per (item, labeller), stable
/// across reloads and restarts, and recorded with each label.
pub fn a_side(item: &str, labeller: &str) -> Side {
    let hash = blake3::hash(format!("{item}\u{0}{labeller}").as_bytes());
    if hash.as_bytes()[0] & 1 == 0 {
        Side::First
    } else {
        Side::Second
    }
}

fn check_name(labeller: &str) -> Result<(), Refusal> {
    let length = labeller.chars().count();
    if length == 0 || length > 64 || labeller.chars().any(char::is_control) {
        return Err(Refusal(
            400,
            "a labeller name is 1 to 64 printable characters".into(),
        ));
    }
    Ok(())
}

fn read_json_body(request: &mut Request) -> Result<Value, Refusal> {
    // A JSON content type forces a CORS preflight on cross-site requests, which we never answer.
    let json_type = request
        .headers()
        .iter()
        .any(|h| h.field.equiv("Content-Type") && h.value.as_str().starts_with("application/json"));
    if !json_type {
        return Err(Refusal(415, "send application/json".into()));
    }
    let mut body = String::new();
    request
        .as_reader()
        .take(MAX_BODY)
        .read_to_string(&mut body)
        .map_err(|e| Refusal(400, format!("cannot read the body: {e}")))?;
    serde_json::from_str(&body).map_err(|e| Refusal(400, format!("the body is not JSON: {e}")))
}

/// JSON with `<`, `>` and `&` escaped, so no model output travels as markup even if a
/// response were ever read as HTML.
pub fn escaped_json(value: &Value) -> String {
    let text = serde_json::to_string(value).unwrap_or_else(|_| "null".into());
    text.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

fn json_response(code: u16, value: &Value) -> Response<std::io::Cursor<Vec<u8>>> {
    text_response(code, "application/json; charset=utf-8", escaped_json(value))
}

fn text_response(
    code: u16,
    content_type: &str,
    body: String,
) -> Response<std::io::Cursor<Vec<u8>>> {
    let mut response = Response::from_string(body).with_status_code(code);
    for (name, value) in [
        ("Content-Type", content_type),
        ("Content-Security-Policy", CSP),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("Cache-Control", "no-store"),
    ] {
        if let Ok(header) = Header::from_bytes(name.as_bytes(), value.as_bytes()) {
            response.add_header(header);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_json_carries_no_markup_and_parses_back_to_the_same_text() {
        let value = json!({ "a": "<script>alert(1)</script> & <img src=x onerror=alert(2)>" });
        let text = escaped_json(&value);
        assert!(!text.contains('<') && !text.contains('>') && !text.contains('&'));
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), value);
    }

    #[test]
    fn side_order_differs_between_items_and_is_stable() {
        let sides: Vec<Side> = (0..32)
            .map(|i| a_side(&format!("item{i}"), "ann"))
            .collect();
        assert!(sides.contains(&Side::First) && sides.contains(&Side::Second));
        assert_eq!(a_side("item1", "ann"), a_side("item1", "ann"));
    }
}
