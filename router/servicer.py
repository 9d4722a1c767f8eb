"""The gRPC servicer: protobuf in, domain call, protobuf out; nothing else."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from grpc import aio

from router import convert
from router.coalescer import Coalescer
from router.domain import RouteInput
from router.pb import router_pb2 as pb
from router.pb import router_pb2_grpc
from router.service import RouteBatch, RoutedRequest, RouterService

if TYPE_CHECKING:
    from router.pooling import Pooling

ADMIN_METHODS = tuple(
    f"/specroute.v1.Router/{name}"
    for name in ("RegisterDrafter", "RemoveDrafter", "ReloadClassifier", "SetPolicy")
)


class RouterServicer(router_pb2_grpc.RouterServicer):
    """specroute.v1.Router over :class:`RouterService`."""

    def __init__(self, service: RouterService, pooling: Pooling | None = None) -> None:
        self._service = service
        self._pooling = pooling  # registrations reach the fleet's other replicas
        self._routes: Coalescer[RouteInput, RouteBatch, RoutedRequest] = Coalescer(
            service.prepare_routes,
            service.commit_routes,
            max_batch=service.limits.route_batch_max,
            on_batch=service.metrics.route_batch_size.observe,
        )

    async def Route(
        self, request: pb.RouteRequest, context: aio.ServicerContext
    ) -> pb.RouteDecision:
        started = time.perf_counter()
        try:
            routed = await self._routes.submit(convert.route_from_pb(request))
        finally:  # refused calls too: the time a caller waited for its answer
            self._service.metrics.route_latency.observe(time.perf_counter() - started)
        return convert.decision_to_pb(routed)

    async def Report(self, request: pb.RouteOutcome, context: aio.ServicerContext) -> pb.ReportAck:
        service = self._service
        outcome = convert.outcome_from_pb(request, service.limits, service.context_tokens)
        version = service.report(outcome)
        return pb.ReportAck(request_id=request.request_id, policy_version=version)

    async def Generate(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        announced: RoutedRequest | None = None
        asked = convert.generate_from_pb(request, context.invocation_metadata())
        async for item in self._service.generate(asked):
            if isinstance(item, RoutedRequest):
                announced = item
            yield convert.generation_item_to_pb(item, announced)

    async def RegisterDrafter(
        self, request: pb.RegisterDrafterRequest, context: aio.ServicerContext
    ) -> pb.DrafterInfo:
        spec = convert.drafter_spec_from_pb(request)
        pooling = self._pooling
        announce = pooling.drafter_registered if pooling is not None else None
        record = await self._service.register_drafter(spec, announce)
        return convert.drafter_to_pb(record)

    async def RemoveDrafter(
        self, request: pb.RemoveDrafterRequest, context: aio.ServicerContext
    ) -> pb.DrafterInfo:
        pooling = self._pooling
        announce = pooling.drafter_removed if pooling is not None else None
        record = await self._service.remove_drafter(request.name, announce)
        return convert.drafter_to_pb(record)

    async def ListDrafters(
        self, request: pb.ListDraftersRequest, context: aio.ServicerContext
    ) -> pb.ListDraftersResponse:
        records = self._service.list_drafters()
        shared = self._pooling.unavailable_drafters() if self._pooling is not None else []
        unavailable = [
            pb.UnavailableDrafter(name=d.name, kind=d.kind, path=d.path, error=d.error)
            for d in shared
        ]
        unavailable.extend(
            pb.UnavailableDrafter(name=r.name, kind=r.kind, path=r.path, error=why)
            for r, why in self._service.drafters.unserved()
        )
        return pb.ListDraftersResponse(
            drafters=[convert.drafter_to_pb(r) for r in records], unavailable=unavailable
        )

    async def ReloadClassifier(
        self, request: pb.ReloadClassifierRequest, context: aio.ServicerContext
    ) -> pb.ClassifierInfo:
        return convert.classifier_to_pb(await self._service.reload_classifier(request.path))

    async def SetPolicy(
        self, request: pb.SetPolicyRequest, context: aio.ServicerContext
    ) -> pb.PolicyState:
        config = convert.policy_config_from_pb(request)
        view = await self._service.set_policy(request.policy, config, request.reset_state)
        return convert.policy_to_pb(view)

    async def GetPolicyState(
        self, request: pb.GetPolicyStateRequest, context: aio.ServicerContext
    ) -> pb.PolicyState:
        return convert.policy_to_pb(self._service.policy_view())
