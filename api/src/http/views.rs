//! `/v1/views`: declared views (create, list, drop) and the query shapes
//! automatic views are chosen from.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use fleetgate_protocol::Role;
use fleetgate_store::views::ViewsFile;
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
    let created = state.views.create(&file).await.map_err(bad_request)?;
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
    if let Some(dependent) = state.views.dependent(&name) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("view {dependent} is built on {name}; drop it first"),
        ));
    }
    state.audit(admin, "view.drop", &name, json!({})).await?;
    match state.views.drop_view(&name).await {
        Ok(true) => Ok(Json(json!({ "dropped": name }))),
        Ok(false) => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no view named {name:?}"),
        )),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e)),
    }
}
