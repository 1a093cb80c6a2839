"""Every topic of the app. Raw bytes in and out: decoding is :mod:`schemas.events`' job."""

from stream.app import app, settings

interactions_topic = app.topic(settings.topic_interactions, key_type=bytes, value_type=bytes,
                               key_serializer="raw", value_serializer="raw")
dlq_topic = app.topic(settings.topic_dlq, key_type=bytes, value_type=bytes,
                      key_serializer="raw", value_serializer="raw", partitions=1)
item_vectors_topic = app.topic(settings.topic_item_vectors, key_type=bytes, value_type=bytes,
                               key_serializer="raw", value_serializer="raw")
items_topic = app.topic(settings.topic_items, key_type=bytes, value_type=bytes,
                        key_serializer="raw", value_serializer="raw")
