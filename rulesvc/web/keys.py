"""The typed keys of what the app and a request hold (aiohttp `AppKey`s and `RequestKey`s)."""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

from rulesvc.channels import ChannelRegistry
from rulesvc.config import Settings
from rulesvc.core.segment import SegmentMapping
from rulesvc.core.sendpolicy import SendPolicy
from rulesvc.metrics import Metrics
from rulesvc.plugins import PluginReport
from rulesvc.replay.simulate import Simulator
from rulesvc.runtime.backtests import BacktestRunner
from rulesvc.runtime.fanout import CatalogFanout
from rulesvc.runtime.inbox import Inbox
from rulesvc.runtime.privacy import TombstoneCache
from rulesvc.runtime.rulesets import Rulesets
from rulesvc.runtime.scheduler import Scheduler
from rulesvc.store.db import Store
from rulesvc.store.keys import ApiKey, InboxTokens, Keys
from rulesvc.store.mongod import EmbeddedMongod
from rulesvc.web.ratelimit import RateLimiter

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
CHANNELS = web.AppKey("channels", ChannelRegistry)
SEND_POLICY = web.AppKey("send_policy", SendPolicy)  # built once: the dispatcher and the simulator share it
PLUGINS = web.AppKey("plugins", list[PluginReport])
LIMITER = web.AppKey("limiter", RateLimiter)
# Test sends per channel: a person checking a provider needs a few, an abuser (SMS to premium numbers,
# spam from the shop's domain) many.
TEST_SENDS = web.AppKey("test_sends", RateLimiter)
OPENAPI = web.AppKey("openapi", bytes)  # the document, generated from the route table
SEGMENT_MAPPING = web.AppKey("segment_mapping", SegmentMapping)  # read at start-up (runtime/segment.py)
# Set by the cleanup contexts (rulesvc.web.lifecycle) as the app starts:
MONGO_URI = web.AppKey("mongo_uri", str)
EMBEDDED_MONGOD = web.AppKey("embedded_mongod", EmbeddedMongod)
STORE = web.AppKey("store", Store)
TOMBSTONES = web.AppKey("tombstones", TombstoneCache)  # this process's copy: ingest asks MongoDB nothing
KEYS = web.AppKey("keys", Keys)
INBOX_TOKENS = web.AppKey("inbox_tokens", InboxTokens)
RULESETS = web.AppKey("rulesets", Rulesets)
INBOX = web.AppKey("inbox", Inbox)
SCHEDULER = web.AppKey("scheduler", Scheduler)
FANOUT = web.AppKey("fanout", CatalogFanout)
SIMULATOR = web.AppKey("simulator", Simulator)
# Set by a Shopify privacy webhook: the loop that carries requests out (runtime/shopify_privacy.py) looks now.
SHOPIFY_PRIVACY = web.AppKey("shopify_privacy", asyncio.Event)
BACKTESTS = web.AppKey("backtests", BacktestRunner)  # this worker's backtest processes, and the job documents

API_KEY = web.RequestKey("api_key", ApiKey)  # the key a request came with, if it came with one
QUERY = web.RequestKey("query", msgspec.Struct)  # the route's query parameters, parsed (web/views/base.py)
