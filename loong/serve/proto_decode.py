"""Request decoding that never fails silently: a bad message becomes INVALID_ARGUMENT.

Owns: the request deserializers of the public gRPC service. protobuf rejects a `string`
field holding invalid UTF-8 while parsing, before any handler runs, and gRPC would answer
UNKNOWN without saying which field. Here a message that does not parse becomes an
`Undecodable` value that the handler turns into INVALID_ARGUMENT; for invalid UTF-8 the
message names the field, found by parsing the bytes again with a twin of the schema in
which every string is `bytes` (built once from the service's own descriptors).
Must not import the engine; protobuf and the generated code only.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

TWIN_SUFFIX = ".bytes_twin"


@dataclass(frozen=True)
class Undecodable:
    """What a deserializer returns for bytes that do not parse as the request."""

    message: str


def tolerant(message_class):
    """A request deserializer for `message_class` that returns `Undecodable` on failure."""
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError:
            bad = bad_utf8_field(message_class, data)
            if bad is not None:
                return Undecodable(f"{bad}: is not valid UTF-8")
            return Undecodable(f"the request is not a valid {message_class.DESCRIPTOR.full_name} "
                               f"message")
    return parse


def bad_utf8_field(message_class, data: bytes) -> str | None:
    """The path of the first string field (e.g. "sampling.stop[1]") whose bytes are not
    UTF-8, or None when the message is broken otherwise."""
    twin = _twin_class(message_class.DESCRIPTOR.file.name, message_class.DESCRIPTOR.full_name)
    try:
        msg = twin.FromString(data)
    except DecodeError:
        return None
    return _find_bad(msg, "")


def _find_bad(msg, prefix: str) -> str | None:
    for fd, value in msg.ListFields():
        path = prefix + fd.name
        items = list(enumerate(value)) if fd.is_repeated else [(None, value)]
        for i, item in items:
            where = path if i is None else f"{path}[{i}]"
            if fd.type == FieldDescriptor.TYPE_BYTES:
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError:
                    return where
            elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                if fd.message_type.GetOptions().map_entry:
                    continue
                found = _find_bad(item, where + ".")
                if found:
                    return found
    return None


@lru_cache(maxsize=None)
def _twin_class(file_name: str, full_name: str):
    """The message class of the same schema with every string field as bytes."""
    pool = descriptor_pool.Default()
    fdp = descriptor_pb2.FileDescriptorProto()
    pool.FindFileByName(file_name).CopyToProto(fdp)
    package = fdp.package
    fdp.name = file_name + TWIN_SUFFIX
    fdp.package = package + TWIN_SUFFIX
    fdp.ClearField("service")
    del fdp.dependency[:]         # the request messages use no imported types

    def rewrite(messages) -> None:
        for m in messages:
            keep_strings = m.options.map_entry      # map keys cannot be bytes
            for f in m.field:
                if f.type == FieldDescriptor.TYPE_STRING and not keep_strings:
                    f.type = FieldDescriptor.TYPE_BYTES
                if f.type_name.startswith(f".{package}."):
                    f.type_name = f".{package}{TWIN_SUFFIX}." + f.type_name[len(package) + 2:]
            rewrite(m.nested_type)

    rewrite(fdp.message_type)
    twin_pool = descriptor_pool.DescriptorPool()
    twin_pool.Add(fdp)
    desc = twin_pool.FindMessageTypeByName(package + TWIN_SUFFIX + full_name[len(package):])
    return message_factory.GetMessageClass(desc)
