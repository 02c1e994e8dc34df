use super::*;

const ON: CompatConfig = CompatConfig {
    responses_translation: true,
    empty_content: true,
    context_length_error: true,
};

fn run(body: &Value) -> Option<Value> {
    translate(body.to_string().as_bytes(), &ON)
        .unwrap()
        .map(|b| serde_json::from_slice(&b).unwrap())
}

/// The shape of `tests/fixtures/cursor_requests.py responses`, one step of history.
fn cursor_responses_body() -> Value {
    json!({
        "model": "gpt-5-acme",
        "instructions": "You are a coding agent working in the user's repository.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Step 0: check src/mod_0.rs"}]},
            {"type": "function_call", "call_id": "call_0", "name": "read_file",
             "arguments": "{\"target_file\": \"src/mod_0.rs\"}"},
            {"type": "function_call_output", "call_id": "call_0", "output": "fn a() {}\n"},
            {"type": "reasoning", "id": "rs_1", "encrypted_content": "opaque"},
            {"role": "user", "content": [{"type": "input_text", "text": "Apply the fix."}]}
        ],
        "tools": [
            {"type": "function", "name": "read_file", "description": "Read a file of the workspace",
             "parameters": {"type": "object", "properties": {"target_file": {"type": "string"}},
                            "required": ["target_file"]}},
            {"type": "custom", "name": "ApplyPatch", "description": "Apply a patch to the workspace",
             "format": {"type": "grammar", "syntax": "lark",
                        "definition": "start: \"*** Begin Patch\" /(.|\\n)*/ \"*** End Patch\""}},
            {"type": "web_search"}
        ],
        "tool_choice": "auto",
        "include": ["reasoning.encrypted_content"],
        "reasoning": {"effort": "medium", "summary": "auto"},
        "text": {"verbosity": "medium"},
        "store": false,
        "truncation": "auto",
        "max_output_tokens": 4096,
        "stream": true,
        "stream_options": {"include_usage": true},
        "user": "cursor-user-1234",
        "x_extra": {"kept": true}
    })
}

#[test]
fn cursor_responses_body_becomes_chat_completions() {
    let out = run(&cursor_responses_body()).expect("translated");
    assert_eq!(
        out["messages"],
        json!([
            {"role": "system", "content": "You are a coding agent working in the user's repository."},
            {"role": "user", "content": "Step 0: check src/mod_0.rs"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_0", "type": "function",
                 "function": {"name": "read_file", "arguments": "{\"target_file\": \"src/mod_0.rs\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_0", "content": "fn a() {}\n"},
            {"role": "user", "content": "Apply the fix."}
        ])
    );
    let tools = out["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 2, "built-in tools are dropped: {tools:?}");
    assert_eq!(tools[0]["type"], "function");
    assert_eq!(tools[0]["function"]["name"], "read_file");
    assert_eq!(
        tools[0]["function"]["parameters"]["required"],
        json!(["target_file"])
    );
    assert_eq!(tools[1]["function"]["name"], "ApplyPatch");
    assert_eq!(
        tools[1]["function"]["parameters"]["required"],
        json!(["input"])
    );
    assert!(
        tools[1]["function"]["parameters"]["properties"]["input"]["description"]
            .as_str()
            .unwrap()
            .contains("*** Begin Patch")
    );
    assert_eq!(out["tool_choice"], "auto");
    assert_eq!(out["max_tokens"], 4096);
    assert_eq!(out["reasoning_effort"], "medium");
    assert_eq!(out["stream"], true);
    assert_eq!(out["stream_options"], json!({"include_usage": true}));
    assert_eq!(out["user"], "cursor-user-1234");
    assert_eq!(out["x_extra"], json!({"kept": true}));
    for gone in [
        "input",
        "instructions",
        "include",
        "reasoning",
        "text",
        "store",
        "truncation",
        "max_output_tokens",
    ] {
        assert!(out.get(gone).is_none(), "{gone} left in {out}");
    }
    // messages right after model (read from the bytes: `Value` sorts keys).
    let bytes = translate(cursor_responses_body().to_string().as_bytes(), &ON)
        .unwrap()
        .unwrap();
    let keys: Vec<String> = serde_json::from_slice::<Fields>(&bytes)
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let at = |k: &str| keys.iter().position(|x| x == k).unwrap();
    assert_eq!(at("messages"), at("model") + 1, "{keys:?}");
}

#[test]
fn parallel_calls_and_text_merge_into_one_assistant_turn() {
    let out = run(&json!({
        "model": "gpt-5",
        "input": [
            {"role": "user", "content": "go"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Reading both."}]},
            {"type": "function_call", "call_id": "a", "name": "read_file", "arguments": "{}"},
            {"type": "function_call", "call_id": "b", "name": "read_file", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "a", "output": [{"type": "input_text", "text": "A"}]},
            {"type": "function_call_output", "call_id": "b", "output": "B"},
            {"type": "custom_tool_call", "call_id": "c", "name": "ApplyPatch", "input": "*** Begin Patch"},
            {"type": "custom_tool_call_output", "call_id": "c", "output": "Done"}
        ]
    }))
    .unwrap();
    let m = out["messages"].as_array().unwrap();
    assert_eq!(m.len(), 6, "{m:?}");
    assert_eq!(m[1]["content"], "Reading both.");
    let calls = m[1]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (calls[0]["id"].as_str(), calls[1]["id"].as_str()),
        (Some("a"), Some("b"))
    );
    assert_eq!(
        m[2],
        json!({"role": "tool", "tool_call_id": "a", "content": "A"})
    );
    assert_eq!(m[3]["content"], "B");
    assert_eq!(m[4]["role"], "assistant");
    assert_eq!(m[4]["content"], Value::Null);
    assert_eq!(
        m[4]["tool_calls"][0]["function"]["arguments"],
        json!({"input": "*** Begin Patch"}).to_string()
    );
    assert_eq!(m[5]["tool_call_id"], "c");
}

#[test]
fn string_input_roles_images_choices_and_formats() {
    let out = run(&json!({"model": "gpt-5", "input": "hello", "instructions": ""})).unwrap();
    assert_eq!(
        out["messages"],
        json!([{"role": "user", "content": "hello"}])
    );

    let out = run(&json!({
        "model": "gpt-5",
        "input": [
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": [
                {"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}
            ]}
        ],
        "tool_choice": {"type": "function", "name": "read_file"},
        "text": {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": true}},
        "reasoning": {"effort": "minimal"}
    }))
    .unwrap();
    assert_eq!(
        out["messages"][0],
        json!({"role": "system", "content": "Be terse."})
    );
    assert_eq!(
        out["messages"][1]["content"],
        json!([
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}
        ])
    );
    assert_eq!(
        out["tool_choice"],
        json!({"type": "function", "function": {"name": "read_file"}})
    );
    assert_eq!(
        out["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": true}})
    );
    // vLLM only knows low/medium/high.
    assert!(out.get("reasoning_effort").is_none());
}

#[test]
fn malformed_responses_bodies_are_400() {
    for body in [
        json!({"model": "gpt-5", "input": 42}),
        json!({"model": "gpt-5", "input": [42]}),
        json!({"model": "gpt-5", "input": [{"role": "wizard", "content": "x"}]}),
        json!({"model": "gpt-5", "input": "x", "instructions": 7}),
    ] {
        let e = translate(body.to_string().as_bytes(), &ON).unwrap_err();
        assert!(matches!(e, ApiError::BadRequest(_)), "{body}: {e:?}");
    }
}

#[test]
fn chat_bodies_that_need_nothing_are_left_byte_for_byte() {
    let body = br#"{"model":"m",  "messages":[{"role":"user","content":"hi"},{"role":"assistant","content":[{"type":"text","text":"x"}]}],"tools":[]}"#;
    assert_eq!(translate(body, &ON).unwrap(), None);
    assert_eq!(translate(b"not json", &ON).unwrap(), None);
    assert_eq!(translate(b"[1,2]", &ON).unwrap(), None);
    // Unchanged fields say so, and the proxy then forwards the client's bytes.
    let mut f: Fields = serde_json::from_slice(body).unwrap();
    let before = serde_json::to_string(&f).unwrap();
    assert!(!translate_fields(Endpoint::ChatCompletions, &mut f, &ON).unwrap());
    assert_eq!(serde_json::to_string(&f).unwrap(), before);
    // Other endpoints are never touched, even Responses-shaped bodies (/v1/responses).
    let r = cursor_responses_body().to_string();
    let mut f: Fields = serde_json::from_str(&r).unwrap();
    let before = serde_json::to_string(&f).unwrap();
    assert!(!translate_fields(Endpoint::Responses, &mut f, &ON).unwrap());
    assert_eq!(serde_json::to_string(&f).unwrap(), before);
}

#[test]
fn empty_content_lists_are_normalised_per_role() {
    let body = json!({
        "model": "m",
        "messages": [
            {"role": "user", "content": []},
            {"role": "assistant", "content": [], "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": [ ]},
            {"role": "assistant", "content": []},
            {"role": "assistant", "content": "ok", "tool_calls": []}
        ],
        "stream": true
    });
    let out = run(&body).unwrap();
    let m = &out["messages"];
    assert_eq!(m[0]["content"], json!([]), "user turns are left alone");
    assert_eq!(m[1]["content"], Value::Null);
    assert_eq!(m[1]["tool_calls"][0]["id"], "c1");
    assert_eq!(m[2]["content"], "");
    assert_eq!(m[3]["content"], "");
    assert_eq!(m[4], json!({"role": "assistant", "content": "ok"}));
    assert_eq!(out["stream"], true);

    // The real Cursor chat body: only its `content: []` changes.
    let raw = r#"{"model":"acme-coder","messages":[{"role":"assistant","content":[],"tool_calls":[{"id":"call_0","type":"function","function":{"name":"read_file","arguments":"{}"}}]}],"user":"u"}"#;
    let out = String::from_utf8(translate(raw.as_bytes(), &ON).unwrap().unwrap()).unwrap();
    assert_eq!(out, raw.replace(r#""content":[]"#, r#""content":null"#));
}

#[test]
fn empty_list_scan() {
    assert!(has_empty_list("[]"));
    assert!(has_empty_list("{\"content\": [ \n ]}"));
    assert!(!has_empty_list(r#"[{"content":"x"}, [1]]"#));
    assert!(!has_empty_list("[ "));
    assert!(!has_empty_list(""));
}

#[test]
fn switches_turn_each_part_off() {
    let off = CompatConfig {
        responses_translation: false,
        empty_content: false,
        context_length_error: false,
    };
    assert_eq!(
        translate(cursor_responses_body().to_string().as_bytes(), &off).unwrap(),
        None
    );
    let only_empty = CompatConfig {
        responses_translation: false,
        ..ON
    };
    assert_eq!(
        translate(cursor_responses_body().to_string().as_bytes(), &only_empty).unwrap(),
        None
    );
    let chat =
        json!({"model": "m", "messages": [{"role": "tool", "tool_call_id": "x", "content": []}]});
    let only_responses = CompatConfig {
        empty_content: false,
        ..ON
    };
    assert_eq!(
        translate(chat.to_string().as_bytes(), &only_responses).unwrap(),
        None
    );
}

#[test]
fn context_length_errors_are_recognised_in_every_known_wording() {
    for m in [
        // vLLM < 0.6
        "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in the messages, 1000 in the completion). Please reduce the length of the messages or completion.",
        // vLLM 0.10
        "This model's maximum context length is 4096 tokens. However, your prompt contains at least 4097 input tokens. Please reduce the length of the messages.",
        // vLLM 0.11+
        "'max_tokens' or 'max_completion_tokens' is too large: 8000. This model's maximum context length is 4096 tokens and your request has 2778 input tokens (8000 > 4096 - 2778).",
        // llama.cpp
        "the request exceeds the available context size, try increasing it",
        // TGI
        "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 `inputs` tokens and 500 `max_new_tokens`",
    ] {
        assert!(is_context_length(m), "{m}");
    }
    for m in [
        "The model `x` does not exist.",
        "1 validation error for ChatCompletionRequest",
        "",
    ] {
        assert!(!is_context_length(m), "{m}");
    }
}

#[test]
fn upstream_messages_are_read_from_every_error_shape() {
    assert_eq!(
        upstream_message(br#"{"object":"error","message":"m1","type":"BadRequestError","param":null,"code":400}"#),
        "m1"
    );
    assert_eq!(
        upstream_message(br#"{"error":{"message":"m2","type":"BadRequestError","code":400}}"#),
        "m2"
    );
    assert_eq!(upstream_message(br#"{"detail":"m3"}"#), "m3");
    assert_eq!(upstream_message(br#"{"error":"m4"}"#), "m4");
    assert_eq!(upstream_message(b"  plain text\n"), "plain text");
    let long = "é".repeat(2000);
    let m = upstream_message(long.as_bytes());
    assert!(m.len() <= 1024 && m.chars().all(|c| c == 'é'));
    let e = ApiError::ContextLengthExceeded("too long".into());
    assert_eq!(e.status(), StatusCode::BAD_REQUEST);
}
