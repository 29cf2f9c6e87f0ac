//! `tebroker envs|leases|queue|history|drain|undrain|hold|release|rebuild`: the API v1 from a
//! terminal. Human tables by default, the API's JSON with `--json`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use http_body_util::BodyExt;

/// Where the API is and how to print its answers.
#[derive(Debug, Args, Clone)]
pub struct ApiArgs {
    /// The broker's `--http` address.
    #[arg(
        long,
        env = "TEBROKER_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// File with the bearer token control commands need (the broker's --api-token-file).
    #[arg(long, env = "TEBROKER_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// For an https:// URL: the CA (PEM) the broker's certificate must chain to.
    #[arg(long, value_name = "PATH", global = true)]
    pub ca: Option<PathBuf>,
    /// For an https:// URL: a client certificate (PEM) signed by the broker's
    /// --http-client-ca, which may control without a token.
    #[arg(long, value_name = "PATH", requires = "key", global = true)]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, value_name = "PATH", requires = "cert", global = true)]
    pub key: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for the answer.
    #[arg(long, default_value = "30", global = true)]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Every TE with its state, holder and failure rate.
    Envs,
    /// TEs leased now.
    Leases,
    /// Lock requests waiting, with position and estimated wait.
    Queue,
    /// Ended leases, newest first.
    History(HistoryArgs),
    /// Take a TE out of rotation once its lease ends.
    Drain(EnvArg),
    /// Put a drained TE back.
    Undrain(EnvArg),
    /// Keep a TE (e.g. for debugging) for `--secs` or until `release`.
    Hold(HoldArgs),
    /// End a hold.
    Release(EnvArg),
    /// Have the TE's agent rebuild it.
    Rebuild(EnvArg),
}

#[derive(Debug, Args)]
pub struct EnvArg {
    /// The TE (`TE` or `AGENT/TE`).
    pub env: String,
}

#[derive(Debug, Args)]
pub struct HoldArgs {
    pub env: String,
    #[arg(long)]
    pub secs: Option<u64>,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[arg(long)]
    pub env: Option<String>,
    #[arg(long)]
    pub job: Option<String>,
    /// `released`, `failed`, `worker lost`, `client lost`, `timed out`, `ended`.
    #[arg(long)]
    pub outcome: Option<String>,
    /// Epoch milliseconds.
    #[arg(long)]
    pub since: Option<i64>,
    #[arg(long)]
    pub until: Option<i64>,
    #[arg(long, default_value = "50")]
    pub limit: u32,
    /// The `next` cursor a previous page printed.
    #[arg(long)]
    pub cursor: Option<String>,
}

/// Runs the command; returns the exit status (1 when the API answered with an error).
pub fn run(args: ApiArgs, command: ApiCommand) -> anyhow::Result<i32> {
    let (method, path, table): (&str, String, fn(&serde_json::Value) -> String) = match &command {
        ApiCommand::Envs => ("GET", "/api/v1/envs".into(), envs_table),
        ApiCommand::Leases => ("GET", "/api/v1/leases".into(), leases_table),
        ApiCommand::Queue => ("GET", "/api/v1/queue".into(), queue_table),
        ApiCommand::History(h) => ("GET", history_path(h), history_table),
        ApiCommand::Drain(e) => ("POST", control_path(&e.env, "drain", None), control_line),
        ApiCommand::Undrain(e) => ("POST", control_path(&e.env, "undrain", None), control_line),
        ApiCommand::Hold(h) => ("POST", control_path(&h.env, "hold", h.secs), control_line),
        ApiCommand::Release(e) => ("POST", control_path(&e.env, "release", None), control_line),
        ApiCommand::Rebuild(e) => ("POST", control_path(&e.env, "rebuild", None), control_line),
    };
    let token = match (&args.token_file, method) {
        (Some(path), "POST") => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string(),
        ),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, body) = runtime.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(args.timeout),
            call(&args, method, &path, token.as_deref()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {} within {} s", args.url, args.timeout))?
    })?;
    let value: serde_json::Value = serde_json::from_slice(&body).with_context(|| {
        format!(
            "{} answered {status} with something other than JSON",
            args.url
        )
    })?;
    if !(200..300).contains(&status) {
        eprintln!(
            "error {status} {}: {}",
            value["error"].as_str().unwrap_or("?"),
            value["message"].as_str().unwrap_or("")
        );
        return Ok(1);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", table(&value));
    }
    Ok(0)
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn control_path(env: &str, op: &str, secs: Option<u64>) -> String {
    let mut p = format!("/api/v1/envs/{}/{op}", encode(env));
    if let Some(s) = secs {
        p.push_str(&format!("?secs={s}"));
    }
    p
}

fn history_path(h: &HistoryArgs) -> String {
    let mut q = vec![format!("limit={}", h.limit)];
    for (k, v) in [
        ("env", &h.env),
        ("job", &h.job),
        ("outcome", &h.outcome),
        ("cursor", &h.cursor),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", encode(v)));
        }
    }
    for (k, v) in [("since", h.since), ("until", h.until)] {
        if let Some(v) = v {
            q.push(format!("{k}={v}"));
        }
    }
    format!("/api/v1/history?{}", q.join("&"))
}

/// One HTTP/1.1 request over a fresh connection (TLS for an https:// URL).
async fn call(
    args: &ApiArgs,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, bytes::Bytes)> {
    let url = args.url.as_str();
    let (authority, tls) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => bail!("--url must be http://HOST:PORT or https://HOST:PORT (got {url:?})"),
    };
    let authority = authority.trim_end_matches('/');
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let mut sender = if tls {
        let Some(ca) = &args.ca else {
            bail!("an https:// URL needs --ca (the CA the broker's certificate chains to)");
        };
        let server: gearman_client::ServerAddr = authority
            .parse()
            .with_context(|| format!("--url {url:?}: not HOST:PORT"))?;
        let config = gearman_client::TlsConfig {
            ssl_ca: Some(ca.clone()),
            ssl_cert: args.cert.clone(),
            ssl_key: args.key.clone(),
        };
        let stream = gearman_client::tls::handshake(&server, &config, stream).await?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        sender
    } else {
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        sender
    };
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority);
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = sender
        .send_request(req.body(http_body_util::Empty::<bytes::Bytes>::new())?)
        .await
        .with_context(|| format!("request to {url} failed"))?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let mut l = String::new();
        for (c, w) in cells.iter().zip(&widths) {
            l.push_str(&format!("{c:<w$}  "));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect(), &mut out);
    for r in rows {
        line(r, &mut out);
    }
    out
}

fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) if s.is_empty() => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn ago(ms: &serde_json::Value) -> String {
    let Some(then) = ms.as_i64() else {
        return "-".into();
    };
    let secs = tebroker_store::now_ms().saturating_sub(then).max(0) / 1000;
    duration(secs)
}

fn duration(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

fn rows(v: &serde_json::Value) -> &[serde_json::Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn envs_table(v: &serde_json::Value) -> String {
    table(
        &[
            "TE",
            "STATE",
            "FOR",
            "HOLDER",
            "AGENT/HOST",
            "FAILURES",
            "LAST OUTCOMES",
        ],
        rows(v)
            .iter()
            .map(|e| {
                vec![
                    text(&e["name"]),
                    text(&e["state"]),
                    ago(&e["since_ms"]),
                    text(&e["holder"]),
                    if e["agent"].is_string() {
                        text(&e["agent"])
                    } else {
                        text(&e["host"])
                    },
                    e["failure_rate"]
                        .as_f64()
                        .map(|r| format!("{:.0}%", r * 100.0))
                        .unwrap_or_else(|| "-".into()),
                    rows(&e["last_outcomes"])
                        .iter()
                        .take(5)
                        .map(text)
                        .collect::<Vec<_>>()
                        .join(","),
                ]
            })
            .collect(),
    )
}

fn leases_table(v: &serde_json::Value) -> String {
    table(
        &["TE", "JOB", "CALLBACK", "HELD", "STATE"],
        rows(v)
            .iter()
            .map(|l| {
                vec![
                    text(&l["worker_id"]),
                    text(&l["job_identifier"]),
                    text(&l["callback"]),
                    duration(l["held_ms"].as_i64().unwrap_or(0) / 1000),
                    text(&l["callback_state"]),
                ]
            })
            .collect(),
    )
}

fn queue_table(v: &serde_json::Value) -> String {
    table(
        &["POS", "JOB", "TENANT", "PRIORITY", "WAITED", "ESTIMATE"],
        rows(v)
            .iter()
            .map(|q| {
                vec![
                    text(&q["position"]),
                    text(&q["job_identifier"]),
                    text(&q["tenant"]),
                    text(&q["priority"]),
                    duration(q["waited_ms"].as_i64().unwrap_or(0) / 1000),
                    q["estimated_wait_ms"]
                        .as_i64()
                        .map(|ms| format!("~{}", duration(ms / 1000)))
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect(),
    )
}

fn history_table(v: &serde_json::Value) -> String {
    let mut out = table(
        &["ENDED", "TE", "JOB", "TENANT", "HELD", "OUTCOME"],
        rows(&v["leases"])
            .iter()
            .map(|l| {
                let held =
                    l["ended_ms"].as_i64().unwrap_or(0) - l["started_ms"].as_i64().unwrap_or(0);
                vec![
                    format!("{} ago", ago(&l["ended_ms"])),
                    text(&l["env"]),
                    text(&l["job_identifier"]),
                    text(&l["tenant"]),
                    duration(held.max(0) / 1000),
                    text(&l["outcome"]),
                ]
            })
            .collect(),
    );
    if let Some(next) = v["next"].as_str() {
        out.push_str(&format!("more: --cursor {next}\n"));
    }
    out
}

fn control_line(v: &serde_json::Value) -> String {
    match v["applied_by"].as_str() {
        Some("agent") => format!(
            "{} {}: agent {}: {}\n",
            text(&v["op"]),
            text(&v["env"]),
            text(&v["agent"]),
            text(&v["reply"])
        ),
        _ => format!(
            "{} {}: done by the broker\n",
            text(&v["op"]),
            text(&v["env"])
        ),
    }
}
