"""Feature definitions of the demo domain: a recommender with users and items.

`feast apply` in this folder registers them. The feature store service, the
materialization job and the demo data generator all read the registry that results;
no other file lists these features.

Each feature view is backed by its own PostgreSQL table named after the view, with the
join key, an `event_timestamp` and a `created` column (the write time, a tie-breaker).
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, ValueType
from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import (
    PostgreSQLSource,
)
from feast.types import Array, Bool, Float32, Float64, Int64, String

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64)


def _source(table: str) -> PostgreSQLSource:
    return PostgreSQLSource(
        name=table,
        table=table,
        timestamp_field="event_timestamp",
        created_timestamp_column="created",
    )


def _fields(spec: str) -> list[Field]:
    """Fields from a compact `name:type` list, one per line, in column order."""
    types = {"f32": Float32, "f64": Float64, "i64": Int64, "bool": Bool, "str": String}
    fields = []
    for line in spec.split():
        name, dtype = line.split(":")
        fields.append(Field(name=name, dtype=types[dtype]))
    return fields


user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(days=365),
    source=_source("user_profile"),
    schema=_fields(
        """
        age:i64 gender:str country:str language:str signup_days:i64 is_premium:bool
        is_verified:bool email_opt_in:bool num_devices:i64 num_friends:i64
        num_followers:i64 avg_session_minutes:f32 credit_score:f32 lifetime_value:f64
        home_lat:f64 home_lon:f64 pref_sports:f32 pref_music:f32 pref_news:f32
        pref_movies:f32 pref_games:f32 pref_tech:f32 pref_fashion:f32 pref_food:f32
        """
    ),
    online=True,
    tags={"team": "recsys"},
)

user_activity = FeatureView(
    name="user_activity",
    entities=[user],
    ttl=timedelta(days=2),
    source=_source("user_activity"),
    schema=_fields(
        """
        clicks_1h:i64 clicks_24h:i64 clicks_7d:i64 views_1h:i64 views_24h:i64
        views_7d:i64 ctr_24h:f32 ctr_7d:f32 purchases_7d:i64 purchases_30d:i64
        spend_7d:f64 spend_30d:f64 avg_dwell_s:f32 sessions_24h:i64
        last_active_hours:f32 is_active_today:bool is_returning:bool cart_size:i64
        searches_24h:i64 skip_rate:f32 share_rate:f32 last_category:str device_type:str
        """
    ),
    online=True,
    tags={"team": "recsys"},
)

item_stats = FeatureView(
    name="item_stats",
    entities=[item],
    ttl=timedelta(days=7),
    source=_source("item_stats"),
    schema=_fields(
        """
        price:f64 discount_pct:f32 category:str brand:str age_days:i64 rating_avg:f32
        rating_count:i64 impressions_24h:i64 clicks_24h:i64 ctr_24h:f32 ctr_7d:f32
        purchases_24h:i64 purchases_7d:i64 revenue_7d:f64 stock_level:i64
        is_in_stock:bool is_promoted:bool return_rate:f32 popularity_score:f64
        freshness_score:f32 quality_score:f32 title_length:i64
        """
    ),
    online=True,
    tags={"team": "catalog"},
)

item_embedding = FeatureView(
    name="item_embedding",
    entities=[item],
    ttl=timedelta(days=30),
    source=_source("item_embedding"),
    schema=[
        Field(
            name="embedding",
            dtype=Array(Float32),
            vector_index=True,
            vector_length=64,
            vector_search_metric="COSINE",
        ),
    ],
    online=True,
    tags={"team": "catalog"},
)

ranking_v1 = FeatureService(
    name="ranking_v1",
    features=[user_profile, user_activity, item_stats],
    tags={"model": "ranker"},
)
