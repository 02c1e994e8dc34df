//! `[gateway]`: capacities and timeouts of the public HTTPS listener, and the Cursor
//! compatibility switches. Every key is optional; [`GatewayConfig::default`] has the defaults.
//! Each value has a bound (no "unlimited"), so a slow or hostile client can never hold a
//! resource forever.

use super::fields::{bounded, duration};
use crate::config::raw::RawGateway;
use crate::config::{CompatConfig, ConfigErrors, GatewayConfig, MAX_JSON_DEPTH};

/// Validates `[gateway]`: each bad value is reported and replaced by its default, so the
/// result is always complete (it is only used when there are no errors).
pub(super) fn validate(errs: &mut ConfigErrors, g: &RawGateway) -> GatewayConfig {
    let d = GatewayConfig::default();
    GatewayConfig {
        max_body_bytes: bounded(
            errs,
            "gateway.max_body_bytes",
            g.max_body_bytes,
            d.max_body_bytes,
            1024,
            1 << 30,
            " bytes (1 KiB to 1 GiB)",
        ),
        max_connections: bounded(
            errs,
            "gateway.max_connections",
            g.max_connections,
            d.max_connections,
            1,
            1_000_000,
            "",
        ),
        tls_handshake_timeout: duration(
            errs,
            "gateway.tls_handshake_timeout",
            g.tls_handshake_timeout.as_deref(),
            d.tls_handshake_timeout,
        ),
        header_read_timeout: duration(
            errs,
            "gateway.header_read_timeout",
            g.header_read_timeout.as_deref(),
            d.header_read_timeout,
        ),
        idle_timeout: duration(
            errs,
            "gateway.idle_timeout",
            g.idle_timeout.as_deref(),
            d.idle_timeout,
        ),
        // hyper refuses (panics on) an HTTP/1 read buffer below 8192 bytes.
        max_header_bytes: bounded(
            errs,
            "gateway.max_header_bytes",
            g.max_header_bytes,
            d.max_header_bytes,
            8192,
            1 << 20,
            " bytes (hyper needs at least 8192)",
        ),
        max_headers: bounded(
            errs,
            "gateway.max_headers",
            g.max_headers,
            d.max_headers,
            1,
            10_000,
            "",
        ),
        upstream_connect_timeout: duration(
            errs,
            "gateway.upstream_connect_timeout",
            g.upstream_connect_timeout.as_deref(),
            d.upstream_connect_timeout,
        ),
        upstream_response_timeout: duration(
            errs,
            "gateway.upstream_response_timeout",
            g.upstream_response_timeout.as_deref(),
            d.upstream_response_timeout,
        ),
        sse_keepalive: duration(
            errs,
            "gateway.sse_keepalive",
            g.sse_keepalive.as_deref(),
            d.sse_keepalive,
        ),
        drain_timeout: duration(
            errs,
            "gateway.drain_timeout",
            g.drain_timeout.as_deref(),
            d.drain_timeout,
        ),
        queue_timeout: duration(
            errs,
            "gateway.queue_timeout",
            g.queue_timeout.as_deref(),
            d.queue_timeout,
        ),
        max_queued: bounded(
            errs,
            "gateway.max_queued",
            g.max_queued,
            d.max_queued,
            0,
            1_000_000,
            " (0 refuses at once when the upstream is saturated)",
        ),
        default_max_tokens: bounded(
            errs,
            "gateway.default_max_tokens",
            g.default_max_tokens,
            d.default_max_tokens as usize,
            1,
            10_000_000,
            " tokens",
        ) as u32,
        body_read_timeout: duration(
            errs,
            "gateway.body_read_timeout",
            g.body_read_timeout.as_deref(),
            d.body_read_timeout,
        ),
        body_min_rate: bounded(
            errs,
            "gateway.body_min_rate",
            g.body_min_rate,
            d.body_min_rate,
            0,
            1 << 30,
            " bytes per second (0 means no extension)",
        ),
        max_json_depth: bounded(
            errs,
            "gateway.max_json_depth",
            g.max_json_depth,
            d.max_json_depth,
            8,
            MAX_JSON_DEPTH,
            " levels (deeper values are refused by the gateway's own JSON parser)",
        ),
        // Booleans need no range check: TOML's types already refused anything else.
        compat: CompatConfig {
            responses_translation: g
                .compat_responses_translation
                .unwrap_or(d.compat.responses_translation),
            empty_content: g.compat_empty_content.unwrap_or(d.compat.empty_content),
            context_length_error: g
                .compat_context_length_error
                .unwrap_or(d.compat.context_length_error),
        },
    }
}
