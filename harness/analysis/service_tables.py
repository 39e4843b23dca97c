"""The tables of services the IOMMU teardown must not call into, as laid out in memory.

The static C3 check (:mod:`harness.analysis.teardown_static`) recognises a
boot service by the table a call goes through and the member's offset in
it: ``call *0x140(%rax)`` with ``%rax`` = ``gBS`` is
``gBS->LocateProtocol``. This module is that knowledge and nothing else:
each table's C type (what DWARF names the pointee of a global such as
``gBS``), its members in the specification's order with their X64 offsets,
the library globals that point to it (for a module without DWARF types),
and what kind of finding a call through it is. Reading the module
(:mod:`harness.analysis.moduleimage`) and following the values
(:mod:`harness.analysis.dataflow`) both need it; neither knows a table's
layout by itself. ``tests/unit/test_teardown_static.py`` holds the boot
services', the PCD protocol's and ``gST->BootServices``' offsets against
the layout the compiler chose (a recorded module's own DWARF).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: ``EFI_TABLE_HEADER`` (Signature u64, Revision u32, HeaderSize u32,
#: CRC32 u32, Reserved u32) on X64, then one 8-byte pointer per member.
TABLE_HEADER_SIZE = 24
POINTER_SIZE = 8

#: ``EFI_BOOT_SERVICES`` members in the UEFI specification's order.
BOOT_SERVICES_MEMBERS = (
    "RaiseTPL", "RestoreTPL",
    "AllocatePages", "FreePages", "GetMemoryMap", "AllocatePool", "FreePool",
    "CreateEvent", "SetTimer", "WaitForEvent", "SignalEvent", "CloseEvent", "CheckEvent",
    "InstallProtocolInterface", "ReinstallProtocolInterface", "UninstallProtocolInterface",
    "HandleProtocol", "Reserved", "RegisterProtocolNotify", "LocateHandle",
    "LocateDevicePath", "InstallConfigurationTable",
    "LoadImage", "StartImage", "Exit", "UnloadImage", "ExitBootServices",
    "GetNextMonotonicCount", "Stall", "SetWatchdogTimer",
    "ConnectController", "DisconnectController",
    "OpenProtocol", "CloseProtocol", "OpenProtocolInformation",
    "ProtocolsPerHandle", "LocateHandleBuffer", "LocateProtocol",
    "InstallMultipleProtocolInterfaces", "UninstallMultipleProtocolInterfaces",
    "CalculateCrc32", "CopyMem", "SetMem", "CreateEventEx",
)

#: ``EFI_DXE_SERVICES`` members in the PI specification's order.
DXE_SERVICES_MEMBERS = (
    "AddMemorySpace", "AllocateMemorySpace", "FreeMemorySpace", "RemoveMemorySpace",
    "GetMemorySpaceDescriptor", "SetMemorySpaceAttributes", "GetMemorySpaceMap",
    "AddIoSpace", "AllocateIoSpace", "FreeIoSpace", "RemoveIoSpace",
    "GetIoSpaceDescriptor", "GetIoSpaceMap", "Dispatch", "Schedule", "Trust",
    "ProcessFirmwareVolume", "SetMemorySpaceCapabilities",
)

#: edk2's ``PCD_PROTOCOL`` (MdePkg ``Protocol/Pcd.h``): no table header.
PCD_PROTOCOL_MEMBERS = (
    "SetSku", "Get8", "Get16", "Get32", "Get64", "GetPtr", "GetBool", "GetSize",
    "Get8Ex", "Get16Ex", "Get32Ex", "Get64Ex", "GetPtrEx", "GetBoolEx", "GetSizeEx",
    "Set8", "Set16", "Set32", "Set64", "SetPtr", "SetBool",
    "Set8Ex", "Set16Ex", "Set32Ex", "Set64Ex", "SetPtrEx", "SetBoolEx",
    "CallbackOnSet", "CancelCallback", "GetNextToken", "GetNextTokenSpace",
)

#: The PI specification's ``EFI_PCD_PROTOCOL`` (every member takes a GUID).
PI_PCD_PROTOCOL_MEMBERS = (
    "SetSku", "Get8", "Get16", "Get32", "Get64", "GetPtr", "GetBool", "GetSize",
    "Set8", "Set16", "Set32", "Set64", "SetPtr", "SetBool",
    "CallbackOnSet", "CancelCallback", "GetNextToken", "GetNextTokenSpace",
)


def member_offsets(members: Sequence[str], header: int = TABLE_HEADER_SIZE
                   ) -> dict[int, str]:
    """Offset -> member name of a table of function pointers after ``header`` bytes."""
    return {header + POINTER_SIZE * index: name for index, name in enumerate(members)}


#: Offset of ``BootServices`` in ``EFI_SYSTEM_TABLE`` on X64: the header,
#: FirmwareVendor (pointer), FirmwareRevision (u32, padded to 8), then
#: ConsoleInHandle, ConIn, ConsoleOutHandle, ConOut, StandardErrorHandle,
#: StdErr, RuntimeServices (7 pointers).
SYSTEM_TABLE_BOOT_SERVICES = TABLE_HEADER_SIZE + POINTER_SIZE + 8 + 7 * POINTER_SIZE


@dataclass(frozen=True, eq=False)
class Table:
    """A table of services the teardown must not call into.

    :param type_name: its C type (what DWARF calls the pointee of a global).
    :param kind: the finding kind of a call through it.
    :param members: offset -> member name.
    :param globals_: the names of the library globals that point to it, for
        a module without DWARF types.
    """

    type_name: str
    kind: str
    members: Mapping[int, str]
    globals_: tuple[str, ...] = ()

    def member(self, offset: int) -> str:
        return self.members.get(offset, f"+{offset:#x}")


BOOT_SERVICES = Table("EFI_BOOT_SERVICES", "boot-service",
                      member_offsets(BOOT_SERVICES_MEMBERS), ("gBS",))
SYSTEM_TABLE = Table("EFI_SYSTEM_TABLE", "reference",
                     {SYSTEM_TABLE_BOOT_SERVICES: "BootServices"}, ("gST",))
DXE_SERVICES = Table("EFI_DXE_SERVICES", "boot-service",
                     member_offsets(DXE_SERVICES_MEMBERS), ("gDS",))
PCD_PROTOCOL = Table("PCD_PROTOCOL", "pcd-protocol",
                     member_offsets(PCD_PROTOCOL_MEMBERS, header=0), ("mPcd",))
PI_PCD_PROTOCOL = Table("EFI_PCD_PROTOCOL", "pcd-protocol",
                        member_offsets(PI_PCD_PROTOCOL_MEMBERS, header=0), ("mPiPcd",))
PCD_INFO = Table("GET_PCD_INFO_PROTOCOL", "pcd-protocol", {}, ("mPcdInfo",))
PI_PCD_INFO = Table("EFI_GET_PCD_INFO_PROTOCOL", "pcd-protocol", {}, ("mPiPcdInfo",))

#: Every table the check tracks, by C type.
TABLES: Mapping[str, Table] = {t.type_name: t for t in (
    BOOT_SERVICES, SYSTEM_TABLE, DXE_SERVICES, PCD_PROTOCOL, PI_PCD_PROTOCOL, PCD_INFO,
    PI_PCD_INFO)}

#: What a boot-service member does, for the report.
SERVICE_GROUPS: Mapping[str, str] = {
    **{name: "TPL" for name in ("RaiseTPL", "RestoreTPL")},
    **{name: "allocator" for name in ("AllocatePages", "FreePages", "GetMemoryMap",
                                      "AllocatePool", "FreePool")},
    **{name: "protocol lookup" for name in (
        "HandleProtocol", "LocateHandle", "LocateDevicePath", "OpenProtocol",
        "OpenProtocolInformation", "ProtocolsPerHandle", "LocateHandleBuffer",
        "LocateProtocol")},
}

