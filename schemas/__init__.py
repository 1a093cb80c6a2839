"""Every contract between producers, workers, serving and front ends lives here."""

from schemas.events import (EVENT_TYPES, Envelope, EventType, Interaction, InvalidEvent,
                            SCHEMA_VERSION)

__all__ = ["EVENT_TYPES", "Envelope", "EventType", "Interaction", "InvalidEvent",
           "SCHEMA_VERSION"]
