"""The department tree: everyone reads it, administrators change it."""

from __future__ import annotations

from server.directory.models import DepartmentIn, DepartmentOut, DepartmentUpdate
from server.services import services
from server.web.api import Call
from server.web.routes import api


@api.route(
    "GET",
    "/api/v1/departments",
    summary="All departments",
    tag="departments",
    response=DepartmentOut,
    many=True,
)
async def list_departments(call: Call) -> list[DepartmentOut]:
    return await services(call.request).directory.list_departments()


@api.route(
    "GET",
    "/api/v1/departments/{department_id}",
    summary="One department",
    tag="departments",
    response=DepartmentOut,
    errors=(404,),
)
async def get_department(call: Call) -> DepartmentOut:
    return await services(call.request).directory.get_department(call.path("department_id"))


@api.route(
    "POST",
    "/api/v1/departments",
    summary="Create a department (admin)",
    tag="departments",
    auth="admin",
    body=DepartmentIn,
    response=DepartmentOut,
    status=201,
)
async def create_department(call: Call) -> DepartmentOut:
    return await services(call.request).directory.create_department(call.body_as(DepartmentIn))


@api.route(
    "PATCH",
    "/api/v1/departments/{department_id}",
    summary="Change a department (admin)",
    tag="departments",
    auth="admin",
    body=DepartmentUpdate,
    response=DepartmentOut,
    errors=(404,),
)
async def update_department(call: Call) -> DepartmentOut:
    return await services(call.request).directory.update_department(
        call.path("department_id"), call.body_as(DepartmentUpdate)
    )


@api.route(
    "DELETE",
    "/api/v1/departments/{department_id}",
    summary="Delete an empty department (admin)",
    tag="departments",
    auth="admin",
    status=204,
    errors=(404, 409),
)
async def delete_department(call: Call) -> None:
    await services(call.request).directory.delete_department(call.path("department_id"))
