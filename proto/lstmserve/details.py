"""The native API's words in its google.rpc error details, shared by the server and the client library
(docs/errors.md has the whole table)."""

# ResourceInfo.resource_type of a session that was not found; its resource_name is the id as the caller sent it.
SESSION_RESOURCE_TYPE = "lstmserve.v1.Session"
# PreconditionFailure.Violation.type of a sequence-number refusal; its subject is the number the session takes next.
SEQUENCE_NUMBER_VIOLATION = "SEQUENCE_NUMBER"
# PreconditionFailure.Violation.type of a request for a retired (draining, unloaded or broken) model version; its
# subject is "<model>@<version>".
MODEL_VERSION_VIOLATION = "MODEL_VERSION"
