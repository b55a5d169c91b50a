//! The live dashboard: a single page and its assets, embedded in the binary (`rust-embed`; in
//! debug builds they are read from `src/dashboard/assets` so edits show on reload). No CDN, no
//! build step: plain ES modules plus the vendored `phoenix` client and uPlot
//! (`assets/vendor/VERSIONS.md`).
//!
//! Every response carries a strict Content-Security-Policy: scripts and styles from this origin
//! only (no inline script, no `eval`), sockets to this origin, no framing.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "src/dashboard/assets/"]
struct Assets;

/// The policy of every dashboard response. `style-src` allows no inline `<style>` or `style=`
/// attributes; scripts set element styles through the CSSOM, which CSP does not govern.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; font-src 'self'; connect-src 'self'; manifest-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" | "webmanifest" => "application/json",
        "md" | "txt" | "LICENSE" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn serve(req: &HttpRequest, path: &str) -> HttpResponse {
    let Some(file) = Assets::get(path) else {
        return HttpResponse::NotFound()
            .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
            .json(serde_json::json!({ "error": "not_found", "message": "no such asset" }));
    };
    let etag = format!("\"{}\"", hex::encode(&file.metadata.sha256_hash()[..12]));
    let unchanged = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut res = if unchanged {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    res.insert_header((header::CONTENT_TYPE, content_type(path)))
        .insert_header((header::ETAG, etag))
        // Revalidate every time (a 304 is cheap): a new binary must never serve old code.
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .insert_header((
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .insert_header((header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")));
    if unchanged {
        return res.finish();
    }
    res.body(file.data.into_owned())
}

/// `GET /`: the page.
pub async fn index(req: HttpRequest) -> HttpResponse {
    serve(&req, "index.html")
}

/// `GET /assets/{path}`.
pub async fn asset(req: HttpRequest, path: web::Path<String>) -> HttpResponse {
    let path = path.into_inner();
    if path.contains("..") {
        return serve(&req, "");
    }
    serve(&req, &path)
}

/// Routes of the dashboard.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(index))
        .route("/assets/{path:.*}", web::get().to(asset));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_names_is_embedded() {
        let html = Assets::get("index.html").expect("index.html");
        let html = String::from_utf8_lossy(&html.data).to_string();
        for part in html.split("/assets/").skip(1) {
            let name = part.split('"').next().unwrap_or_default();
            assert!(
                Assets::get(name).is_some(),
                "{name} is named but not embedded"
            );
        }
        assert!(!html.contains("<script>"), "no inline script");
        assert!(!html.contains("style=\""), "no inline style");
    }
}
