//! The PostgreSQL wire endpoint (`--pg`): psql, psycopg and other
//! PostgreSQL clients query the store through it.
//!
//! The user is the device id and the password its token, checked by the
//! same authenticator as MQTT and HTTP; only roles that may query get in.
//! Every query goes through [`QueryService::answer`], exactly as
//! `/v1/query` does: the guard, view routing, limits and observation are
//! the same code. What this module adds is only the protocol: parameters
//! are bound into the text as literals *before* the guard sees it; a few
//! session statements (`BEGIN`/`COMMIT`, harmless `SET`, `SHOW`,
//! `SELECT version()`) are answered here; and the catalog queries of
//! psql's `\dt` and `\d` are answered from the store's catalog of streams
//! (what the caller may query), never from the database's own tables.

use std::collections::HashSet;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use fleetgate_admin::{Registry, RegistryEvent};
use fleetgate_protocol::schema::{FieldType, RECEIVED_AT};
use fleetgate_protocol::{AuthError, Authenticate, Principal};
use futures::{Sink, SinkExt};
use pgwire::api::auth::driver::AuthDriver;
use pgwire::api::auth::{
    protocol_negotiation, save_startup_parameters_to_metadata, DefaultServerParameterProvider,
    StartupHandler,
};
use pgwire::api::cancel::{CancelHandler, DefaultCancelHandler};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DataRowEncoder, DescribePortalResponse, DescribeStatementResponse, FieldFormat, FieldInfo,
    QueryResponse, Response, Tag,
};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, PgWireConnectionState, PgWireServerHandlers, Type, METADATA_USER,
};
use pgwire::api::{
    ConnectionHandle, ConnectionManager, PidSecretKeyGenerator, RandomPidSecretKeyGenerator,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult, SEVERITY_ERROR, SEVERITY_FATAL};
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use serde_json::Value;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};
use tokio::net::TcpListener;

use crate::{QueryFailure, QueryService};
use fleetgate_store::row_stream::RowStream;
use pgwire::messages::data::DataRow;

/// The version `SELECT version()` and `server_version` give: clients pick
/// their catalog queries by it.
pub const SERVER_VERSION: &str = "16.0";

/// [`SERVER_VERSION`] as `server_version_num` gives it.
pub const SERVER_VERSION_NUM: u32 = 160_000;

/// What the endpoint needs.
pub struct PgServer {
    pub queries: QueryService,
    /// The one authenticator (the same `TokenAuthenticator` as MQTT and HTTP).
    pub auth: Arc<dyn Authenticate>,
    /// Whose change notifications end sessions (revocation, role change, ban).
    pub registry: Registry,
    /// TLS with the certificates of MQTTS and HTTPS, when configured; then
    /// a password is taken only over TLS.
    pub tls: Option<pgwire::tokio::TlsAcceptor>,
    /// Each session's key for cancel requests (psql's Ctrl-C), and the
    /// sessions by key.
    pub cancels: Cancels,
}

/// The sessions a cancel request may name, with the keys they were given:
/// one generator for the server, so no two sessions share a process id.
pub struct Cancels {
    sessions: Arc<ConnectionManager>,
    keys: Arc<dyn PidSecretKeyGenerator>,
}

impl Default for Cancels {
    fn default() -> Self {
        Cancels {
            sessions: Arc::new(ConnectionManager::new()),
            keys: Arc::new(RandomPidSecretKeyGenerator::default()),
        }
    }
}

/// A cancel request for an answer being sent. pgwire itself stops a query
/// that is cancelled while it starts (until its first rows: dropping it
/// interrupts the database); this covers the rows after, which are sent
/// once pgwire has stopped listening. It listens only from then on, as
/// installing a listener replaces pgwire's.
struct Cancel {
    session: Option<Arc<ConnectionHandle>>,
    listening: Option<futures::channel::oneshot::Receiver<()>>,
}

impl Cancel {
    fn of<C: ClientInfo>(client: &C) -> Cancel {
        Cancel {
            session: client
                .session_extensions()
                .get::<Arc<ConnectionHandle>>()
                .map(|handle| (*handle).clone()),
            listening: None,
        }
    }

    /// Resolves when the client asked to cancel; never if the request was
    /// superseded (the next query installed its own).
    async fn requested(&mut self) {
        if let Some(session) = self.session.take() {
            self.listening = Some(session.start_query().await);
        }
        if let Some(receiver) = &mut self.listening {
            if receiver.await.is_ok() {
                return;
            }
            self.listening = None;
        }
        std::future::pending::<()>().await
    }
}

/// What PostgreSQL answers a cancelled query with.
fn cancelled() -> PgWireError {
    error("57014", "canceling statement due to user request".into())
}

/// The TLS acceptor of MQTTS and HTTPS (same certificate), offering the
/// ALPN protocol `postgresql`, which clients using direct TLS require.
pub fn acceptor(shared: &pgwire::tokio::TlsAcceptor) -> pgwire::tokio::TlsAcceptor {
    let mut config = (**shared.config()).clone();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    pgwire::tokio::TlsAcceptor::from(Arc::new(config))
}

impl PgServer {
    /// Accepts connections on `listener` until the process ends.
    pub fn serve(self: Arc<Self>, listener: TcpListener) {
        tokio::spawn(async move {
            loop {
                let (socket, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "pg: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let server = self.clone();
                tokio::spawn(async move { server.connection(socket, peer).await });
            }
        });
    }

    async fn connection(self: Arc<Self>, socket: tokio::net::TcpStream, peer: SocketAddr) {
        let conn = Arc::new(Connection {
            server: self.clone(),
            peer,
            session: OnceLock::new(),
            described: Mutex::new(Vec::new()),
        });
        // Subscribed before the session exists, so no event is missed.
        let mut events = self.registry.subscribe();
        let ended = async {
            loop {
                match events.recv().await {
                    Ok(
                        RegistryEvent::Revoked(device)
                        | RegistryEvent::RoleChanged(device, _)
                        | RegistryEvent::Banned(device),
                    ) if conn.device() == Some(device.as_str()) => return device,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => std::future::pending::<()>().await,
                }
            }
        };
        tokio::select! {
            result = pgwire::tokio::process_socket(socket, self.tls.clone(), Handlers(conn.clone())) => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "pg: connection ended");
                }
            }
            device = ended => {
                tracing::info!(device, "pg: registry change; session closed");
            }
        }
    }
}

/// An authenticated session: who, and the token it proved it with (checked
/// again before every query, so nothing outlives its token).
struct Session {
    principal: Principal,
    token: String,
}

/// One client connection's handlers and state.
struct Connection {
    server: Arc<PgServer>,
    peer: SocketAddr,
    session: OnceLock<Session>,
    /// Results computed to describe a portal, kept for its Execute (the
    /// portal's state allocation, held here, identifies it).
    described: Mutex<Vec<(DescribedKey, Outcome)>>,
}

type DescribedKey = Arc<tokio::sync::Mutex<pgwire::api::portal::PortalExecutionState>>;

/// At most this many described portals wait for their Execute.
const MAX_DESCRIBED: usize = 4;

impl Connection {
    fn device(&self) -> Option<&str> {
        self.session.get().map(|s| s.principal.device_id.as_str())
    }

    /// The session's principal, re-authenticated: a token revoked, expired
    /// or banned since ends the session (FATAL), as it would on MQTT.
    fn principal(&self) -> PgWireResult<Principal> {
        let session = self
            .session
            .get()
            .ok_or_else(|| fatal("28000", "not authenticated".into()))?;
        let principal = self
            .server
            .auth
            .authenticate(Some(&session.principal.device_id), &session.token)
            .map_err(|e| auth_error(&session.principal.device_id, e))?;
        self.server
            .queries
            .authorize(&principal, "pg")
            .map_err(|e| fatal("28000", e.to_string()))?;
        Ok(principal)
    }

    /// Whether a cleartext password may cross this connection: over TLS
    /// when TLS is configured, else only from loopback.
    fn transport_allowed(&self, secure: bool) -> Result<(), String> {
        if self.server.tls.is_some() {
            if secure {
                Ok(())
            } else {
                Err(
                    "fleetgate takes passwords (tokens) only over TLS here: connect with \
                     sslmode=require"
                        .into(),
                )
            }
        } else if self.peer.ip().is_loopback() {
            Ok(())
        } else {
            Err(format!(
                "fleetgate takes passwords (tokens) in clear only from loopback; {} is not \
                 (configure TLS: --cert and --key, or --dev-tls)",
                self.peer.ip()
            ))
        }
    }

    /// Answers one statement with `params` bound.
    async fn respond(&self, sql: &str, params: &[Param]) -> PgWireResult<Outcome> {
        let principal = self.principal()?;
        let sql = bind_parameters(sql, params).map_err(|e| error("08P01", e))?;
        if let Some(outcome) = self.session_statement(&sql)? {
            return Ok(outcome);
        }
        if is_catalog_query(&sql) {
            return self.catalog_query(&sql).await;
        }
        let queries = &self.server.queries;
        let answer = queries
            .answer(&principal, "pg", &sql)
            .await
            .map_err(query_error)?;
        Ok(Outcome::Rows(Rows::streamed(
            answer.rows,
            queries.clone(),
            &self.timestamp_columns(&sql),
        )))
    }

    /// Result column names sent as `timestamptz`: `received_at` and the
    /// timestamp fields of the streams the text names.
    fn timestamp_columns(&self, sql: &str) -> HashSet<String> {
        let words = identifiers(sql);
        self.server
            .queries
            .timestamp_fields(|stream| words.iter().any(|w| w == stream))
    }
}

/// A query's outcome as the wire sends it.
enum Outcome {
    Rows(Rows),
    Command(String),
    Begin,
    End(&'static str),
}

/// The wire type of a result column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int8,
    Float8,
    Bool,
    Text,
    Timestamptz,
}

impl Kind {
    fn pg_type(self) -> Type {
        match self {
            Kind::Int8 => Type::INT8,
            Kind::Float8 => Type::FLOAT8,
            Kind::Bool => Type::BOOL,
            Kind::Text => Type::TEXT,
            Kind::Timestamptz => Type::TIMESTAMPTZ,
        }
    }
}

/// A result: typed columns and its rows, encoded only as they are sent.
struct Rows {
    columns: Vec<(String, Kind)>,
    source: Source,
}

enum Source {
    /// Answered here (settings, the catalog).
    Held(Vec<Vec<Value>>),
    /// A query's rows as the store yields them, its first batch read.
    Streamed(Box<(RowStream, QueryService)>),
}

impl Rows {
    /// A query's answer, typed by its first rows ([`Rows::kinds`]).
    fn streamed(rows: RowStream, queries: QueryService, timestamps: &HashSet<String>) -> Rows {
        let columns = Rows::kinds(&rows.columns, rows.first_rows(), timestamps);
        Rows {
            columns,
            source: Source::Streamed(Box::new((rows, queries))),
        }
    }

    fn held(names: Vec<String>, rows: Vec<Vec<Value>>, timestamps: &HashSet<String>) -> Rows {
        Rows {
            columns: Rows::kinds(&names, &rows, timestamps),
            source: Source::Held(rows),
        }
    }

    fn text(names: &[&str], rows: Vec<Vec<Value>>) -> Rows {
        Rows {
            columns: names.iter().map(|n| (n.to_string(), Kind::Text)).collect(),
            source: Source::Held(rows),
        }
    }

    /// Each column's type from `rows`, the first batch of a streamed
    /// answer: integers are int8, with a float among them float8, booleans
    /// bool, anything else text (JSON as its text); integer columns named
    /// in `timestamps` are timestamptz (epoch milliseconds, as stored). A
    /// later row that does not fit its column's type is an error
    /// ([`encode`]), never a silent NULL.
    fn kinds(
        names: &[String],
        rows: &[Vec<Value>],
        timestamps: &HashSet<String>,
    ) -> Vec<(String, Kind)> {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut kind: Option<Kind> = None;
                for value in rows.iter().filter_map(|r| r.get(i)) {
                    let this = match value {
                        Value::Null => continue,
                        Value::Bool(_) => Kind::Bool,
                        Value::Number(n) if n.is_i64() => Kind::Int8,
                        Value::Number(_) => Kind::Float8,
                        _ => Kind::Text,
                    };
                    kind = Some(match (kind, this) {
                        (None, k) => k,
                        (Some(a), b) if a == b => a,
                        (Some(Kind::Int8), Kind::Float8) | (Some(Kind::Float8), Kind::Int8) => {
                            Kind::Float8
                        }
                        _ => Kind::Text,
                    });
                    if kind == Some(Kind::Text) {
                        break;
                    }
                }
                let mut kind = kind.unwrap_or(Kind::Text);
                if kind == Kind::Int8 && timestamps.contains(name) {
                    kind = Kind::Timestamptz;
                }
                (name.clone(), kind)
            })
            .collect()
    }

    fn fields(&self, format: &Format) -> Vec<FieldInfo> {
        self.columns
            .iter()
            .enumerate()
            .map(|(i, (name, kind))| {
                FieldInfo::new(
                    name.clone(),
                    None,
                    None,
                    kind.pg_type(),
                    format_of(format, i),
                )
            })
            .collect()
    }

    /// The response: rows encoded one at a time as the connection sends
    /// them, taken from the store batch by batch, so the answer is never
    /// held whole. An error after the first rows (the byte bound, the
    /// timeout) ends it with an ErrorResponse, as PostgreSQL ends a query
    /// that fails midway.
    fn response(self, format: &Format, cancel: Cancel) -> QueryResponse {
        let fields = Arc::new(self.fields(format));
        let columns: Vec<Column> = self
            .columns
            .into_iter()
            .zip(fields.iter())
            .map(|((name, kind), field)| Column {
                name,
                kind,
                binary: field.format() == FieldFormat::Binary,
            })
            .collect();
        let encoder = DataRowEncoder::new(fields.clone());
        let (batch, more) = match self.source {
            Source::Held(rows) => (rows.into_iter(), None),
            Source::Streamed(streamed) => (Vec::new().into_iter(), Some(*streamed)),
        };
        let stream = futures::stream::unfold(
            (batch, more, encoder, columns, cancel),
            |(mut batch, mut more, mut encoder, columns, mut cancel)| async move {
                loop {
                    if let Some(row) = batch.next() {
                        let encoded = encode_row(&mut encoder, &row, &columns);
                        return Some((encoded, (batch, more, encoder, columns, cancel)));
                    }
                    let (rows, queries) = more.as_mut()?;
                    let next = tokio::select! {
                        next = rows.next_batch() => next?.map_err(|e| query_error(queries.failure(e))),
                        () = cancel.requested() => Err(cancelled()),
                    };
                    match next {
                        Ok(next) => batch = next.into_iter(),
                        // Dropping the rows stops the query.
                        Err(e) => return Some((Err(e), (batch, None, encoder, columns, cancel))),
                    }
                }
            },
        );
        QueryResponse::new(fields, stream)
    }
}

fn format_of(format: &Format, i: usize) -> FieldFormat {
    match format {
        Format::Individual(codes) => codes
            .get(i)
            .map_or(FieldFormat::Text, |c| FieldFormat::from(*c)),
        other => other.format_for(i),
    }
}

/// A result column as its rows are encoded.
struct Column {
    name: String,
    kind: Kind,
    binary: bool,
}

fn encode_row(
    encoder: &mut DataRowEncoder,
    row: &[Value],
    columns: &[Column],
) -> PgWireResult<DataRow> {
    for (value, column) in row.iter().zip(columns) {
        encode(encoder, value, column).map_err(|value| {
            error(
                "42804",
                format!(
                    "column {} is {} (from the answer's first rows), but a later row holds \
                     {value}: CAST the column to one type",
                    column.name,
                    column.kind.pg_type().name()
                ),
            )
        })??;
    }
    Ok(encoder.take_row())
}

/// Encodes `value` as its column's type; the value itself when it does
/// not fit.
fn encode(
    encoder: &mut DataRowEncoder,
    value: &Value,
    column: &Column,
) -> Result<PgWireResult<()>, Value> {
    let misfit = || value.clone();
    Ok(match (column.kind, value) {
        (_, Value::Null) => encoder.encode_field(&None::<i64>),
        (Kind::Text, Value::String(s)) => encoder.encode_field(&s.as_str()),
        (Kind::Text, other) => encoder.encode_field(&other.to_string()),
        (Kind::Int8, v) => encoder.encode_field(&whole_number(v).ok_or_else(misfit)?),
        (Kind::Float8, v) => encoder.encode_field(&v.as_f64().ok_or_else(misfit)?),
        (Kind::Bool, Value::Bool(b)) => encoder.encode_field(b),
        (Kind::Bool, v) => match v.as_i64() {
            Some(n @ (0 | 1)) => encoder.encode_field(&(n == 1)),
            _ => return Err(misfit()),
        },
        (Kind::Timestamptz, v) => {
            let time = v
                .as_i64()
                .and_then(chrono::DateTime::<chrono::Utc>::from_timestamp_millis)
                .ok_or_else(misfit)?;
            match column.binary {
                true => encoder.encode_field(&time),
                false => encoder.encode_field(&timestamptz_text(&time).as_str()),
            }
        }
    })
}

/// `time` as PostgreSQL prints a timestamptz in UTC with DateStyle ISO
/// (`2026-01-01 00:00:00.123000+00`). Written digit by digit: chrono's
/// formatter parses its pattern again for every value, which was a fifth
/// of the time a large answer with timestamps took to send.
fn timestamptz_text(time: &chrono::DateTime<chrono::Utc>) -> String {
    use chrono::{Datelike, Timelike};
    let year = time.year();
    if !(0..=9999).contains(&year) {
        return time.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
    }
    let micros = time.timestamp_subsec_micros().min(999_999);
    let mut text = String::with_capacity(29);
    push_digits(&mut text, year as u32, 4);
    for (separator, value, width) in [
        ('-', time.month(), 2),
        ('-', time.day(), 2),
        (' ', time.hour(), 2),
        (':', time.minute(), 2),
        (':', time.second(), 2),
        ('.', micros, 6),
    ] {
        text.push(separator);
        push_digits(&mut text, value, width);
    }
    text.push_str("+00");
    text
}

/// `n`'s last `width` decimal digits, zero-padded.
fn push_digits(text: &mut String, n: u32, width: u32) {
    for place in (0..width).rev() {
        text.push(char::from(b'0' + (n / 10u32.pow(place) % 10) as u8));
    }
}

/// An integer, or a float that holds one exactly (SQLite may hand either
/// for the same column).
fn whole_number(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    })
}

/// An error the client shows with its SQLSTATE.
fn error(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        SEVERITY_ERROR.to_owned(),
        code.to_owned(),
        message,
    )))
}

/// An error that ends the session.
fn fatal(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        SEVERITY_FATAL.to_owned(),
        code.to_owned(),
        message,
    )))
}

/// An authentication refusal as PostgreSQL gives it: a bad password (a
/// token that is not this device's valid token) is 28P01, a device that
/// may not connect (revoked, banned) 28000.
fn auth_error(user: &str, e: AuthError) -> PgWireError {
    match e {
        AuthError::BadCredentials(_) | AuthError::ClientIdMismatch { .. } => fatal(
            "28P01",
            format!("password authentication failed for user \"{user}\": {e}"),
        ),
        AuthError::NotAuthorized(..) | AuthError::Banned { .. } => fatal("28000", e.to_string()),
    }
}

fn query_error(failure: QueryFailure) -> PgWireError {
    let code = match &failure {
        QueryFailure::Forbidden(_) => "42501",
        QueryFailure::Invalid(_) => "42000",
        QueryFailure::Timeout(_) => "57014",
        QueryFailure::TooLarge(_) => "54000",
        QueryFailure::Unavailable(_) => "53000",
    };
    error(code, failure.to_string())
}

fn outcome_response(outcome: Outcome, format: &Format, cancel: Cancel) -> Response {
    match outcome {
        Outcome::Rows(rows) => Response::Query(rows.response(format, cancel)),
        Outcome::Command(tag) => Response::Execution(Tag::new(&tag)),
        Outcome::Begin => Response::TransactionStart(Tag::new("BEGIN")),
        Outcome::End(tag) => Response::TransactionEnd(Tag::new(tag)),
    }
}

/// The handlers of one connection, all over its [`Connection`].
struct Handlers(Arc<Connection>);

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.0.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.0.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.0.clone()
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        Arc::new(DefaultCancelHandler::new(
            self.0.server.cancels.sessions.clone(),
        ))
    }
}

/// What the session reports at start-up.
fn parameters() -> DefaultServerParameterProvider {
    let mut parameters = DefaultServerParameterProvider::default();
    parameters.server_version = SERVER_VERSION.to_string();
    parameters.is_superuser = false;
    parameters.default_transaction_read_only = true;
    parameters
}

#[async_trait]
impl StartupHandler for Connection {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                self.transport_allowed(client.is_secure())
                    .map_err(|e| fatal("28000", e))?;
                if client.metadata().get(METADATA_USER).is_none() {
                    return Err(PgWireError::UserNameRequired);
                }
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(
                        Authentication::CleartextPassword,
                    ))
                    .await?;
                Ok(())
            }
            PgWireFrontendMessage::PasswordMessageFamily(message) => {
                if self.session.get().is_some() {
                    return Err(PgWireError::NoAuthenticationInProgress);
                }
                let token = message.into_password()?.password;
                let user = client
                    .metadata()
                    .get(METADATA_USER)
                    .cloned()
                    .ok_or(PgWireError::UserNameRequired)?;
                let principal = self
                    .server
                    .auth
                    .authenticate(Some(&user), token.trim())
                    .map_err(|e| auth_error(&user, e))?;
                // Ingest devices may not query: refused (and recorded) here.
                self.server
                    .queries
                    .authorize(&principal, "pg")
                    .map_err(|e| fatal("28000", e.to_string()))?;
                tracing::info!(device = %principal.device_id, peer = %self.peer, "pg: session opened");
                let _ = self.session.set(Session {
                    principal,
                    token: token.trim().to_string(),
                });
                AuthDriver::<_, ()>::new(parameters())
                    .with_pid_secret_key_generator(self.server.cancels.keys.clone())
                    .with_connection_manager(self.server.cancels.sessions.clone())
                    .complete_authentication(client, None)
                    .await
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl SimpleQueryHandler for Connection {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let outcome = self.respond(query, &[]).await?;
        Ok(vec![outcome_response(
            outcome,
            &Format::UnifiedText,
            Cancel::of(client),
        )])
    }
}

/// Statements are kept as their text: each is checked when it runs, with
/// its parameters bound.
#[derive(Debug, Default)]
struct TextParser;

#[async_trait]
impl QueryParser for TextParser {
    type Statement = String;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<String>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        Ok(Some(sql.to_string()))
    }

    fn get_parameter_types(&self, stmt: &String) -> PgWireResult<Vec<Type>> {
        Ok(vec![Type::TEXT; placeholder_count(stmt)])
    }

    fn get_result_schema(
        &self,
        _stmt: &String,
        _column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(Vec::new())
    }
}

#[async_trait]
impl ExtendedQueryHandler for Connection {
    type Statement = String;
    type QueryParser = TextParser;

    fn query_parser(&self) -> Arc<TextParser> {
        Arc::new(TextParser)
    }

    async fn do_describe_statement<C>(
        &self,
        _client: &mut C,
        target: &StoredStatement<String>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = String>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        // Result types come from values, so the statement runs (with NULL
        // parameters) to be described.
        let count = placeholder_count(&target.statement).max(target.parameter_types.len());
        let types = (0..count)
            .map(|i| {
                target
                    .parameter_types
                    .get(i)
                    .cloned()
                    .flatten()
                    .unwrap_or(Type::TEXT)
            })
            .collect();
        let nulls = vec![Param::Null; count];
        let fields = match self.respond(&target.statement, &nulls).await? {
            Outcome::Rows(rows) => rows.fields(&Format::UnifiedText),
            _ => Vec::new(),
        };
        Ok(DescribeStatementResponse::new(types, fields))
    }

    async fn do_describe_portal<C>(
        &self,
        _client: &mut C,
        portal: &Portal<String>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = String>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        // A portal's columns are known once it has run: it runs now, and
        // its Execute sends what it found.
        let params = portal_params(portal)?;
        let outcome = self.respond(&portal.statement.statement, &params).await?;
        let fields = match &outcome {
            Outcome::Rows(rows) => rows.fields(&portal.result_column_format),
            _ => Vec::new(),
        };
        let mut described = self.described.lock().expect("described lock");
        described.retain(|(key, _)| !Arc::ptr_eq(key, &portal.state));
        if described.len() >= MAX_DESCRIBED {
            described.remove(0);
        }
        described.push((portal.state.clone(), outcome));
        Ok(DescribePortalResponse::new(fields))
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<String>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = String>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let described = {
            let mut described = self.described.lock().expect("described lock");
            described
                .iter()
                .position(|(key, _)| Arc::ptr_eq(key, &portal.state))
                .map(|i| described.remove(i).1)
        };
        let outcome = match described {
            Some(outcome) => outcome,
            None => {
                let params = portal_params(portal)?;
                self.respond(&portal.statement.statement, &params).await?
            }
        };
        Ok(outcome_response(
            outcome,
            &portal.result_column_format,
            Cancel::of(client),
        ))
    }
}

/// A bound parameter, as the literal it becomes.
#[derive(Debug, Clone, PartialEq)]
enum Param {
    Null,
    Int(i64),
    Float(f64),
    /// A NUMERIC's text (checked to be a number).
    Numeric(String),
    Bool(bool),
    Text(String),
}

impl Param {
    fn literal(&self) -> Result<String, String> {
        let signed = |text: String| {
            if text.starts_with('-') {
                format!("({text})")
            } else {
                text
            }
        };
        Ok(match self {
            Param::Null => "NULL".into(),
            Param::Int(i) => signed(i.to_string()),
            Param::Float(f) if f.is_finite() => signed(format!("{f:?}")),
            Param::Float(f) => return Err(format!("parameter {f} is not a finite number")),
            Param::Numeric(n) => signed(n.clone()),
            Param::Bool(b) => if *b { "TRUE" } else { "FALSE" }.into(),
            Param::Text(s) if s.contains('\0') => {
                return Err("a text parameter may not hold a NUL character".into())
            }
            Param::Text(s) => format!("'{}'", s.replace('\'', "''")),
        })
    }
}

/// The portal's parameters, decoded by their declared types (text or
/// binary format). Timestamps become epoch milliseconds, as stored.
fn portal_params(portal: &Portal<String>) -> PgWireResult<Vec<Param>> {
    let types = &portal.statement.parameter_types;
    let binary = |i: usize| match &portal.parameter_format {
        Format::Individual(codes) => codes.get(i).is_some_and(|c| *c == 1),
        other => other.is_binary(i),
    };
    portal
        .parameters
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let Some(raw) = raw else {
                return Ok(Param::Null);
            };
            let ty = types.get(i).cloned().flatten().unwrap_or(Type::UNKNOWN);
            let decoded = if binary(i) {
                binary_param(&ty, raw)
            } else {
                std::str::from_utf8(raw)
                    .map_err(|_| "a text parameter is not UTF-8".to_string())
                    .and_then(|text| text_param(&ty, text))
            };
            decoded.map_err(|e| error("22P02", format!("parameter ${}: {e}", i + 1)))
        })
        .collect()
}

fn text_param(ty: &Type, text: &str) -> Result<Param, String> {
    let bad = |what: &str| format!("{text:?} is not {what}");
    Ok(match *ty {
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => {
            Param::Int(text.trim().parse().map_err(|_| bad("an integer"))?)
        }
        Type::FLOAT4 | Type::FLOAT8 => {
            Param::Float(text.trim().parse().map_err(|_| bad("a number"))?)
        }
        Type::NUMERIC => {
            let text = text.trim();
            if text.parse::<f64>().is_err()
                || !text
                    .chars()
                    .all(|c| c.is_ascii_digit() || "+-.eE".contains(c))
            {
                return Err(bad("a number"));
            }
            Param::Numeric(text.to_string())
        }
        Type::BOOL => match text.trim().to_ascii_lowercase().as_str() {
            "t" | "true" | "on" | "yes" | "y" | "1" => Param::Bool(true),
            "f" | "false" | "off" | "no" | "n" | "0" => Param::Bool(false),
            _ => return Err(bad("a boolean")),
        },
        Type::TIMESTAMPTZ | Type::TIMESTAMP => Param::Int(timestamp_ms(text)?),
        _ => Param::Text(text.to_string()),
    })
}

/// A timestamp's text as epoch milliseconds; one without an offset is UTC.
fn timestamp_ms(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let spaced = text.replacen('T', " ", 1);
    for format in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%#z"] {
        if let Ok(t) = chrono::DateTime::parse_from_str(&spaced, format) {
            return Ok(t.timestamp_millis());
        }
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M:%S"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(&spaced, format) {
            return Ok(t.and_utc().timestamp_millis());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp_millis());
    }
    Err(format!("{text:?} is not a timestamp"))
}

fn binary_param(ty: &Type, raw: &Bytes) -> Result<Param, String> {
    let fixed = |n: usize| -> Result<&[u8], String> {
        if raw.len() == n {
            Ok(&raw[..])
        } else {
            Err(format!(
                "a binary {} is {n} bytes, not {}",
                ty.name(),
                raw.len()
            ))
        }
    };
    Ok(match *ty {
        Type::INT2 => Param::Int(i16::from_be_bytes(fixed(2)?.try_into().expect("2")).into()),
        Type::INT4 => Param::Int(i32::from_be_bytes(fixed(4)?.try_into().expect("4")).into()),
        Type::OID => Param::Int(u32::from_be_bytes(fixed(4)?.try_into().expect("4")).into()),
        Type::INT8 => Param::Int(i64::from_be_bytes(fixed(8)?.try_into().expect("8"))),
        Type::FLOAT4 => Param::Float(f32::from_be_bytes(fixed(4)?.try_into().expect("4")).into()),
        Type::FLOAT8 => Param::Float(f64::from_be_bytes(fixed(8)?.try_into().expect("8"))),
        Type::BOOL => Param::Bool(fixed(1)?[0] != 0),
        // Microseconds since 2000-01-01 UTC.
        Type::TIMESTAMPTZ | Type::TIMESTAMP => {
            let micros = i64::from_be_bytes(fixed(8)?.try_into().expect("8"));
            Param::Int(micros.div_euclid(1000) + 946_684_800_000)
        }
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => Param::Text(
            String::from_utf8(raw.to_vec()).map_err(|_| "a text parameter is not UTF-8")?,
        ),
        _ => {
            return Err(format!(
                "binary parameters of type {} are not supported; send it as text",
                ty.name()
            ))
        }
    })
}

/// The highest `$n` in `sql`.
fn placeholder_count(sql: &str) -> usize {
    Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize()
        .map(|tokens| {
            tokens
                .iter()
                .filter_map(|t| match t {
                    Token::Placeholder(p) => p.strip_prefix('$')?.parse::<usize>().ok(),
                    _ => None,
                })
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// `sql` with each `$n` replaced by parameter n as a literal, so that the
/// query the guard checks is exactly the one that runs.
fn bind_parameters(sql: &str, params: &[Param]) -> Result<String, String> {
    let tokens = match Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize_with_location() {
        Ok(tokens) => tokens,
        // Not for us to judge: the guard will say what is wrong with it.
        Err(_) if params.is_empty() => return Ok(sql.to_string()),
        Err(e) => return Err(format!("cannot read the query's parameters: {e}")),
    };
    // Byte offset of each line's start (locations count from 1).
    let mut line_starts = vec![0];
    line_starts.extend(sql.match_indices('\n').map(|(i, _)| i + 1));
    let offset = |line: u64, column: u64| -> usize {
        let start = line_starts
            .get(line.saturating_sub(1) as usize)
            .copied()
            .unwrap_or(sql.len());
        sql[start..]
            .char_indices()
            .nth(column.saturating_sub(1) as usize)
            .map_or(sql.len(), |(i, _)| start + i)
    };
    let mut out = String::with_capacity(sql.len());
    let mut copied = 0;
    for (i, token) in tokens.iter().enumerate() {
        let Token::Placeholder(p) = &token.token else {
            continue;
        };
        let Some(n) = p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) else {
            return Err(format!("unsupported placeholder {p}: use $1, $2, ..."));
        };
        let param = params
            .get(n.wrapping_sub(1))
            .ok_or_else(|| format!("there is no parameter ${n}"))?;
        let start = offset(token.span.start.line, token.span.start.column);
        let end = tokens.get(i + 1).map_or(sql.len(), |next| {
            offset(next.span.start.line, next.span.start.column)
        });
        out.push_str(&sql[copied..start]);
        out.push_str(&param.literal()?);
        copied = end;
    }
    out.push_str(&sql[copied..]);
    Ok(out)
}

/// `sql` lower-cased, whitespace collapsed, without a trailing semicolon.
fn normalized(sql: &str) -> String {
    sql.trim()
        .trim_end_matches(';')
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The words of `sql` that could name a table, lower-cased.
fn identifiers(sql: &str) -> Vec<String> {
    sql.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Settings `SET` accepts (and ignores: a session's answers do not depend
/// on them) and `SHOW` answers.
const HARMLESS_SETTINGS: &[&str] = &[
    "application_name",
    "client_encoding",
    "client_min_messages",
    "datestyle",
    "extra_float_digits",
    "idle_in_transaction_session_timeout",
    "intervalstyle",
    "lock_timeout",
    "search_path",
    "statement_timeout",
    "timezone",
    "bytea_output",
    "standard_conforming_strings",
    "default_transaction_isolation",
    "default_transaction_read_only",
];

impl Connection {
    fn settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("server_version", SERVER_VERSION.to_string()),
            ("server_version_num", SERVER_VERSION_NUM.to_string()),
            ("server_encoding", "UTF8".into()),
            ("client_encoding", "UTF8".into()),
            ("datestyle", "ISO, YMD".into()),
            ("intervalstyle", "postgres".into()),
            ("timezone", "Etc/UTC".into()),
            ("integer_datetimes", "on".into()),
            ("standard_conforming_strings", "on".into()),
            ("search_path", "public".into()),
            ("is_superuser", "off".into()),
            ("transaction_isolation", "read committed".into()),
            ("default_transaction_isolation", "read committed".into()),
            ("transaction_read_only", "on".into()),
            ("default_transaction_read_only", "on".into()),
            ("max_identifier_length", "63".into()),
            ("bytea_output", "hex".into()),
            ("extra_float_digits", "1".into()),
            ("client_min_messages", "notice".into()),
            (
                "statement_timeout",
                format!("{}", self.server.queries.timeout.as_millis()),
            ),
            ("application_name", String::new()),
        ]
    }

    /// Statements about the session rather than the data: transactions
    /// (each query reads on its own; `BEGIN` and `COMMIT` are accepted so
    /// that clients which open one work), `SET` of harmless settings,
    /// `SHOW`, and the functions clients ask about the server.
    fn session_statement(&self, sql: &str) -> PgWireResult<Option<Outcome>> {
        let text = normalized(sql);
        let first = text.split(' ').next().unwrap_or_default();
        let one = |name: &str, value: String| {
            Some(Outcome::Rows(Rows::text(
                &[name],
                vec![vec![Value::String(value)]],
            )))
        };
        let user = self.device().unwrap_or_default().to_string();
        Ok(match first {
            "begin" | "start" => Some(Outcome::Begin),
            "commit" | "end" => Some(Outcome::End("COMMIT")),
            // Savepoints (psycopg's nested transactions) are accepted
            // alike: nothing is written to undo.
            "savepoint" | "release" => Some(Outcome::Command(first.to_uppercase())),
            "rollback" if text.starts_with("rollback to ") => {
                Some(Outcome::Command("ROLLBACK".into()))
            }
            "rollback" | "abort" => Some(Outcome::End("ROLLBACK")),
            "discard" | "reset" => Some(Outcome::Command(first.to_uppercase())),
            "set" => {
                let rest = text["set".len()..].trim_start();
                let rest = rest
                    .strip_prefix("session ")
                    .or_else(|| rest.strip_prefix("local "))
                    .unwrap_or(rest);
                let name = rest
                    .split([' ', '='])
                    .next()
                    .unwrap_or_default();
                if name == "transaction" || name == "time" || HARMLESS_SETTINGS.contains(&name) {
                    Some(Outcome::Command("SET".into()))
                } else {
                    return Err(error(
                        "0A000",
                        format!(
                            "SET {name} is not supported here: fleetgate accepts (and ignores) only {}",
                            HARMLESS_SETTINGS.join(", ")
                        ),
                    ));
                }
            }
            "show" => {
                let name = match text["show".len()..].trim() {
                    // PostgreSQL's spellings with spaces (SQLAlchemy asks
                    // the first at connect).
                    "transaction isolation level" => "transaction_isolation",
                    "time zone" => "timezone",
                    name => name,
                };
                let settings = self.settings();
                if name == "all" {
                    Some(Outcome::Rows(Rows::text(
                        &["name", "setting", "description"],
                        settings
                            .into_iter()
                            .map(|(n, v)| vec![n.into(), v.into(), Value::String(String::new())])
                            .collect(),
                    )))
                } else if let Some((n, v)) = settings.into_iter().find(|(n, _)| *n == name) {
                    one(n, v)
                } else {
                    return Err(error(
                        "42704",
                        format!("unrecognized configuration parameter \"{name}\""),
                    ));
                }
            }
            "select" => match text.as_str() {
                "select version()" | "select pg_catalog.version()" => one(
                    "version",
                    format!(
                        "PostgreSQL {SERVER_VERSION} (fleetgate {}; queries run read-only through fleetgate's query path)",
                        env!("CARGO_PKG_VERSION")
                    ),
                ),
                "select current_user" | "select session_user" | "select user" => {
                    one(text.trim_start_matches("select "), user)
                }
                "select current_database()" => one("current_database", "fleetgate".into()),
                "select current_schema()" | "select current_schema" => {
                    one("current_schema", "public".into())
                }
                // Grafana's data source settings page asks this for the
                // major version (it picks features by it).
                "select current_setting('server_version_num')::int/100 as version" => {
                    Some(Outcome::Rows(Rows::held(
                        vec!["version".into()],
                        vec![vec![Value::from(SERVER_VERSION_NUM / 100)]],
                        &HashSet::new(),
                    )))
                }
                _ => None,
            },
            _ => None,
        })
    }
}

/// Whether `sql` asks about the database's catalog: answered from the
/// store's catalog of streams, never from the database's own tables.
fn is_catalog_query(sql: &str) -> bool {
    const CATALOG: &[&str] = &[
        "pg_catalog",
        "information_schema",
        "pg_class",
        "pg_namespace",
        "pg_attribute",
        "pg_type",
        "pg_database",
        "pg_settings",
        "pg_roles",
        "pg_user",
        "pg_proc",
        "pg_index",
        "pg_am",
        "pg_description",
        "pg_extension",
    ];
    identifiers(sql)
        .iter()
        .any(|w| CATALOG.contains(&w.as_str()))
}

/// The oid a table is known by in catalog answers (stable across queries).
fn table_oid(name: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    16_384 + hash % 1_000_000_000
}

/// psql's name pattern (`^(temp.*)$`): `.` any character, `.*` any
/// run, `\x` the character x; anything else itself.
fn pattern_matches(pattern: &str, name: &str) -> bool {
    let inner = pattern
        .strip_prefix("^(")
        .and_then(|p| p.strip_suffix(")$"))
        .unwrap_or(pattern);
    #[derive(Debug)]
    enum Piece {
        Char(char),
        Any,
        AnyRun,
    }
    let mut pieces = Vec::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => pieces.push(Piece::Char(chars.next().unwrap_or('\\'))),
            '.' if chars.peek() == Some(&'*') => {
                chars.next();
                pieces.push(Piece::AnyRun);
            }
            '.' => pieces.push(Piece::Any),
            c => pieces.push(Piece::Char(c)),
        }
    }
    fn matches(pieces: &[Piece], name: &[char]) -> bool {
        match pieces.split_first() {
            None => name.is_empty(),
            Some((Piece::AnyRun, rest)) => (0..=name.len()).any(|i| matches(rest, &name[i..])),
            Some((Piece::Any, rest)) => !name.is_empty() && matches(rest, &name[1..]),
            Some((Piece::Char(c), rest)) => name.first() == Some(c) && matches(rest, &name[1..]),
        }
    }
    let name: Vec<char> = name.chars().collect();
    pieces.len() <= 256 && matches(&pieces, &name)
}

/// The first quoted literal after `marker` in `text`.
fn literal_after<'t>(text: &'t str, marker: &str) -> Option<&'t str> {
    let start = text.find(marker)? + marker.len();
    let rest = text[start..].trim_start();
    let rest = rest.strip_prefix('\'')?;
    Some(&rest[..rest.find('\'')?])
}

/// The quoted names in a catalog query's `relname IN ('a', 'b')`
/// (SQLAlchemy's filter, its parameters bound as `'a'::VARCHAR`).
fn relname_list(text: &str) -> Vec<String> {
    let Some(start) = text.find("relname in (").map(|i| i + "relname in (".len()) else {
        return Vec::new();
    };
    let Some(length) = text[start..].find(')') else {
        return Vec::new();
    };
    text[start..start + length]
        .split('\'')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// A column of a catalog answer: its name and the text (as lower-cased
/// SQL, with its alias) that decides its value.
struct CatalogColumn {
    name: String,
    key: String,
}

/// The select list of a catalog query.
fn catalog_columns(sql: &str) -> PgWireResult<Vec<CatalogColumn>> {
    use sqlparser::ast::{Expr, SelectItem, SetExpr, Statement};
    if sql.len() > 64 * 1024 {
        return Err(error("54000", "catalog query too long".into()));
    }
    let statements = sqlparser::parser::Parser::new(&PostgreSqlDialect {})
        .with_recursion_limit(32)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| error("0A000", format!("catalog query not supported: {e}")))?;
    let Some(Statement::Query(query)) = statements.first() else {
        return Err(error("0A000", "catalog query not supported".into()));
    };
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Ok(Vec::new());
    };
    let name_of = |expr: &Expr| match expr {
        Expr::Identifier(i) => i.value.clone(),
        Expr::CompoundIdentifier(parts) => {
            parts.last().map(|i| i.value.clone()).unwrap_or_default()
        }
        Expr::Function(f) => f.name.0.last().map(|p| p.to_string()).unwrap_or_default(),
        _ => "?column?".to_string(),
    };
    Ok(select
        .projection
        .iter()
        .map(|item| match item {
            SelectItem::UnnamedExpr(expr) => CatalogColumn {
                name: name_of(expr),
                key: expr.to_string().to_lowercase(),
            },
            SelectItem::ExprWithAlias { expr, alias } => CatalogColumn {
                name: alias.value.clone(),
                key: format!("{} as {}", expr, alias.value).to_lowercase(),
            },
            other => CatalogColumn {
                name: "?column?".into(),
                key: other.to_string().to_lowercase(),
            },
        })
        .collect())
}

/// A readable table's columns as `\d` shows them: name and type.
struct TableColumn {
    name: String,
    ty: &'static str,
}

impl Connection {
    /// The tables the caller may query (the guard's own list), by oid.
    fn readable(&self) -> Vec<(u32, String)> {
        let mut tables: Vec<(u32, String)> = self
            .server
            .queries
            .tables()
            .into_iter()
            .map(|t| (table_oid(&t), t))
            .collect();
        tables.sort_by(|a, b| a.1.cmp(&b.1));
        tables
    }

    async fn table_columns(&self, table: &str) -> Vec<TableColumn> {
        use fleetgate_store::values::ColumnKind;
        let catalog = &self.server.queries.catalog;
        let stream = catalog.get(table).or_else(|| {
            table
                .strip_prefix("fgs_")
                .and_then(|s| catalog.get(s))
                .filter(|s| s.bucket().is_some())
        });
        if let Some(stream) = stream {
            let timestamp = |c: &str| {
                c == RECEIVED_AT
                    || stream
                        .def
                        .fields
                        .get(c)
                        .is_some_and(|d| d.ty == FieldType::Timestamp && !d.code)
            };
            let mut columns: Vec<TableColumn> = stream
                .query_columns()
                .into_iter()
                .map(|c| {
                    let ty = match stream.column_kind(&c) {
                        _ if timestamp(&c) => "timestamp with time zone",
                        Some(ColumnKind::Int) => "bigint",
                        Some(ColumnKind::Float) => "double precision",
                        Some(ColumnKind::Bool) => "boolean",
                        Some(ColumnKind::Text) | None => "text",
                    };
                    TableColumn { name: c, ty }
                })
                .collect();
            if stream.name != table {
                columns.push(TableColumn {
                    name: fleetgate_store::catalog::SUPERSEDED_BY.to_string(),
                    ty: "bigint",
                });
            }
            return columns;
        }
        // Batch and analysis tables: names only.
        fleetgate_store::query::columns(&self.server.queries.db, &format!("SELECT * FROM {table}"))
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|name| TableColumn { name, ty: "text" })
            .collect()
    }

    /// Answers psql's `\dt` and `\d` catalog queries from the store's
    /// catalog; any other catalog query gets its columns and no rows.
    async fn catalog_query(&self, sql: &str) -> PgWireResult<Outcome> {
        let columns = catalog_columns(sql)?;
        let text = normalized(sql);
        let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        let tables = self.readable();
        let pattern = literal_after(&text, "c.relname operator(pg_catalog.~)")
            .or_else(|| literal_after(&text, "c.relname ~"))
            .map(str::to_string);
        let by_pattern = |name: &str| pattern.as_deref().is_none_or(|p| pattern_matches(p, name));
        let oid_in = |marker: &str| {
            literal_after(&text, marker)
                .and_then(|oid| oid.parse::<u32>().ok())
                .and_then(|oid| tables.iter().find(|(o, _)| *o == oid).cloned())
        };
        let row = |value: &dyn Fn(&str) -> Option<String>| -> Vec<Value> {
            columns
                .iter()
                .map(|c| value(&c.key).map_or(Value::Null, Value::String))
                .collect()
        };
        let mut rows = Vec::new();
        if text.contains("pg_attribute.attname as name") && text.contains("as format_type") {
            // SQLAlchemy's `inspect(conn).get_columns(...)`: the columns of
            // the tables named in `relname IN (…)`, by table, in order.
            let mut named = relname_list(&text);
            named.sort();
            for table in named.iter().filter(|t| tables.iter().any(|(_, n)| n == *t)) {
                for column in self.table_columns(table).await {
                    rows.push(
                        columns
                            .iter()
                            .map(|c| match c.name.as_str() {
                                "name" => Value::from(column.name.clone()),
                                "format_type" => Value::from(column.ty),
                                "not_null" => Value::Bool(false),
                                "table_name" => Value::from(table.clone()),
                                // attgenerated: '' for a column not generated.
                                "generated" => Value::from(""),
                                _ => Value::Null,
                            })
                            .collect(),
                    );
                }
            }
            let names = names.iter().map(|n| n.to_string()).collect();
            return Ok(Outcome::Rows(Rows::held(names, rows, &HashSet::new())));
        }
        if text.contains("from information_schema.tables") {
            // Grafana's table picker (and any `information_schema` listing).
            let schema = literal_after(&text, "table_schema) =")
                .or_else(|| literal_after(&text, "table_schema ="));
            let only = literal_after(&text, "table_name) =")
                .or_else(|| literal_after(&text, "table_name ="));
            if schema.is_none_or(|s| s == "public") {
                for (_, name) in tables.iter().filter(|(_, n)| only.is_none_or(|o| o == n)) {
                    rows.push(row(&|key| {
                        Some(match key {
                            k if k.contains("table_name") => name.clone(),
                            k if k.contains("table_schema") => "public".into(),
                            k if k.contains("table_type") => "BASE TABLE".into(),
                            k if k.contains("table_catalog") => "fleetgate".into(),
                            _ => return None,
                        })
                    }));
                }
            }
            return Ok(Outcome::Rows(Rows::text(&names, rows)));
        }
        if text.contains("from information_schema.columns") {
            // Grafana's column picker: one table's columns, with types.
            let table = literal_after(&text, "parse_ident(")
                .map(|t| t.rsplit('.').next().unwrap_or(t))
                .or_else(|| literal_after(&text, "table_name) ="))
                .or_else(|| literal_after(&text, "table_name ="));
            if let Some((_, table)) = table.and_then(|t| tables.iter().find(|(_, n)| n == t)) {
                for (i, column) in self.table_columns(table).await.iter().enumerate() {
                    rows.push(row(&|key| {
                        Some(match key {
                            k if k.contains("column_name") => column.name.clone(),
                            k if k.contains("data_type") => column.ty.to_string(),
                            k if k.contains("ordinal_position") => (i + 1).to_string(),
                            k if k.contains("is_nullable") => "YES".into(),
                            k if k.contains("table_name") => table.clone(),
                            k if k.contains("table_schema") => "public".into(),
                            k if k.contains("table_catalog") => "fleetgate".into(),
                            _ => return None,
                        })
                    }));
                }
            }
            return Ok(Outcome::Rows(Rows::text(&names, rows)));
        }
        if text.starts_with("select pg_catalog.pg_class.relname from pg_catalog.pg_class") {
            // SQLAlchemy's `get_table_names` and `has_table`: tables (relkind
            // 'r'), perhaps only those named.
            let kinds = text
                .split("pg_catalog.pg_class.relkind = any (array[")
                .nth(1)
                .and_then(|rest| rest.split(']').next());
            let named: Option<Vec<&str>> = text
                .split("pg_catalog.pg_class.relname in (")
                .nth(1)
                .and_then(|rest| rest.split(')').next())
                .map(|list| list.split('\'').skip(1).step_by(2).collect());
            if kinds.is_some_and(|k| k.contains("'r'")) {
                for (_, name) in tables
                    .iter()
                    .filter(|(_, n)| named.as_ref().is_none_or(|ns| ns.contains(&n.as_str())))
                {
                    rows.push(row(&|key| key.contains("relname").then(|| name.clone())));
                }
            }
            return Ok(Outcome::Rows(Rows::text(&names, rows)));
        }
        let listing = text.contains("from pg_catalog.pg_class c")
            && text
                .split("c.relkind in (")
                .nth(1)
                .and_then(|rest| rest.split(')').next())
                .is_some_and(|kinds| kinds.contains("'r'"));
        if text.starts_with("select c.oid, n.nspname, c.relname from pg_catalog.pg_class c") {
            // \d NAME: which tables the pattern names.
            for (oid, name) in tables.iter().filter(|(_, n)| by_pattern(n)) {
                rows.push(row(&|key| {
                    Some(match key {
                        "c.oid" => oid.to_string(),
                        "n.nspname" => "public".into(),
                        "c.relname" => name.clone(),
                        _ => return None,
                    })
                }));
            }
        } else if text.contains("c.relchecks") {
            // \d NAME: the table's properties.
            if oid_in("where c.oid =").is_some() {
                rows.push(row(&|key| {
                    let flag = [
                        "relhasindex",
                        "relhasrules",
                        "relhastriggers",
                        "relrowsecurity",
                        "relforcerowsecurity",
                        "relhasoids",
                        "relispartition",
                    ];
                    Some(match key {
                        "''" => String::new(),
                        k if k.contains("relchecks") => "0".into(),
                        k if k.contains("reloftype") => String::new(),
                        k if k.contains("relkind") => "r".into(),
                        k if flag.iter().any(|f| k.contains(f)) => "f".into(),
                        k if k.contains("reltablespace") => "0".into(),
                        k if k.contains("relpersistence") => "p".into(),
                        k if k.contains("relreplident") => "d".into(),
                        k if k.contains("amname") => "heap".into(),
                        _ => return None,
                    })
                }));
            }
        } else if text.contains("from pg_catalog.pg_attribute a") {
            // \d NAME: the table's columns.
            if let Some((_, table)) = oid_in("a.attrelid =") {
                for column in self.table_columns(&table).await {
                    rows.push(row(&|key| {
                        Some(match key {
                            k if k.contains("pg_get_expr") || k.contains("collname") => {
                                return None
                            }
                            k if k.contains("format_type") => column.ty.to_string(),
                            k if k.contains("attname") => column.name.clone(),
                            k if k.contains("attnotnull") => "f".into(),
                            k if k.contains("attidentity")
                                || k.contains("attgenerated")
                                || k.contains("attcompression") =>
                            {
                                String::new()
                            }
                            k if k.contains("attstorage") => "x".into(),
                            _ => return None,
                        })
                    }));
                }
            }
        } else if listing {
            // \dt: the tables the caller may query.
            for (_, name) in tables.iter().filter(|(_, n)| by_pattern(n)) {
                rows.push(row(&|key| {
                    Some(match key {
                        k if k.ends_with("as schema") => "public".into(),
                        k if k.ends_with("as name") => name.clone(),
                        k if k.ends_with("as type") => "table".into(),
                        k if k.ends_with("as owner") => "fleetgate".into(),
                        _ => return None,
                    })
                }));
            }
        }
        Ok(Outcome::Rows(Rows::text(&names, rows)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_become_literals_where_placeholders_are() {
        let sql = "SELECT a FROM t WHERE a = $1 AND b = '$1' AND c > $2 AND d = $1";
        let bound = bind_parameters(sql, &[Param::Text("it's".into()), Param::Int(-3)]).unwrap();
        assert_eq!(
            bound,
            "SELECT a FROM t WHERE a = 'it''s' AND b = '$1' AND c > (-3) AND d = 'it''s'"
        );
        assert!(bind_parameters("SELECT $2", &[Param::Null]).is_err());
        assert_eq!(
            bind_parameters("SELECT 1\n  WHERE x = $1", &[Param::Float(1.5)]).unwrap(),
            "SELECT 1\n  WHERE x = 1.5"
        );
        assert_eq!(placeholder_count("SELECT $1, $3"), 3);
    }

    #[test]
    fn timestamps_become_epoch_milliseconds() {
        assert_eq!(
            timestamp_ms("2026-01-01 00:00:01.5+00").unwrap(),
            1_767_225_601_500
        );
        assert_eq!(
            timestamp_ms("2026-01-01T00:00:01+00:00").unwrap(),
            1_767_225_601_000
        );
        assert_eq!(
            timestamp_ms("2026-01-01 00:00:01").unwrap(),
            1_767_225_601_000
        );
        assert!(timestamp_ms("yesterday").is_err());
    }

    #[test]
    fn sqlalchemy_filters_name_their_tables() {
        let text = normalized(
            "SELECT 1 FROM pg_catalog.pg_class WHERE pg_catalog.pg_class.relname \
             IN ('temperature'::VARCHAR, 'orders'::VARCHAR) ORDER BY 1",
        );
        assert_eq!(relname_list(&text), ["temperature", "orders"]);
        assert!(relname_list("select 1").is_empty());
    }

    #[test]
    fn psql_patterns() {
        assert!(pattern_matches("^(temperature)$", "temperature"));
        assert!(!pattern_matches("^(temperature)$", "temperatures"));
        assert!(pattern_matches("^(temp.*)$", "temperature"));
        assert!(pattern_matches("^(te.perature)$", "temperature"));
        assert!(!pattern_matches("^(pressure)$", "temperature"));
    }

    #[test]
    fn a_later_row_that_does_not_fit_its_column_is_refused_not_nulled() {
        let fields = Arc::new(vec![FieldInfo::new(
            "n".into(),
            None,
            None,
            Type::INT8,
            FieldFormat::Text,
        )]);
        let columns = [Column {
            name: "n".into(),
            kind: Kind::Int8,
            binary: false,
        }];
        let mut encoder = DataRowEncoder::new(fields);
        assert!(encode_row(&mut encoder, &[Value::from(2.0)], &columns).is_ok());
        assert!(encode_row(&mut encoder, &[Value::Null], &columns).is_ok());
        let Err(PgWireError::UserError(refusal)) =
            encode_row(&mut encoder, &[Value::from(2.5)], &columns)
        else {
            panic!("2.5 is not an int8");
        };
        assert_eq!(refusal.code, "42804");
        assert!(
            refusal.message.contains("column n is int8"),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn timestamps_print_as_postgresql_prints_them() {
        for ms in [
            0,
            1_767_225_600_123,
            1_767_225_600_000,
            -1,
            253_402_300_799_999,
        ] {
            let time = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms).unwrap();
            assert_eq!(
                timestamptz_text(&time),
                time.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string(),
                "{ms}"
            );
        }
        let time = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(1_767_225_600_123);
        assert_eq!(
            timestamptz_text(&time.unwrap()),
            "2026-01-01 00:00:00.123000+00"
        );
    }

    #[test]
    fn column_types_come_from_the_first_rows() {
        let rows = Rows::held(
            vec![
                "a".into(),
                "b".into(),
                "c".into(),
                "received_at".into(),
                "e".into(),
            ],
            vec![
                vec![1.into(), 1.into(), true.into(), 5.into(), Value::Null],
                vec![2.into(), 1.5.into(), Value::Null, 6.into(), Value::Null],
            ],
            &["received_at".to_string()].into(),
        );
        let kinds: Vec<Kind> = rows.columns.iter().map(|(_, k)| *k).collect();
        assert_eq!(
            kinds,
            [
                Kind::Int8,
                Kind::Float8,
                Kind::Bool,
                Kind::Timestamptz,
                Kind::Text
            ]
        );
    }
}
