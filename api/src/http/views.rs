//! `/v1/views`: declared views (create, list, drop) and the query shapes
//! automatic views are chosen from.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use fleetgate_protocol::Role;
use fleetgate_store::views::{ViewError, ViewsFile};
use serde_json::{json, Value};

use super::{bad_request, ApiError, AppState, Caller};

pub async fn create_views(
    State(state): State<AppState>,
    caller: Caller,
    body: String,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    let file = ViewsFile::parse(&body).map_err(bad_request)?;
    let names: Vec<&String> = file.views.keys().collect();
    state
        .audit(admin, "view.create", "views", json!({ "views": names }))
        .await?;
    let created = state.views.create(&file).await.map_err(refusal)?;
    Ok(Json(json!({ "created": created })))
}

pub async fn list_views(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let views = state
        .views
        .list()
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(json!({ "views": views })))
}

/// The query shapes the store has logged, with what it decided for each.
pub async fn list_shapes(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Extract, &state)?;
    let shapes = state
        .views
        .shapes()
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(json!({ "shapes": shapes })))
}

pub async fn drop_view(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let admin = caller.require(Role::Admin, &state)?;
    // Refused before it is audited: a drop that cannot happen is not one.
    if let Some(dependent) = state.views.dependent(&name) {
        return Err(refusal(ViewError::DependedOn {
            view: name,
            dependent,
        }));
    }
    state.audit(admin, "view.drop", &name, json!({})).await?;
    match state.views.drop_view(&name).await {
        Ok(true) => Ok(Json(json!({ "dropped": name }))),
        Ok(false) => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no view named {name:?}"),
        )),
        Err(e) => Err(refusal(e)),
    }
}

/// The status a view error answers with.
fn refusal(error: ViewError) -> ApiError {
    let status = match &error {
        ViewError::Invalid(_) => StatusCode::BAD_REQUEST,
        ViewError::Exists(_) | ViewError::DependedOn { .. } => StatusCode::CONFLICT,
        ViewError::Database(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(status, error.to_string())
}
