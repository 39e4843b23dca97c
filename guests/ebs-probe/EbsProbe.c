/** @file
  EbsProbe: the guest payload of the ovmf-ebs-harness.

  Booted as \EFI\BOOT\BOOTX64.EFI from a FAT image on virtio-blk, it
  0. reports the memory encryption the platform offers, as the guest sees
     it: CPUID 0x8000001F and, where that leaf says SEV, the SEV_STATUS MSR,
  1. reads "\ebs-probe.cfg" (key=value lines, see README.md) from its own
     volume,
  2. reads the per-run canary file through the file system, so that the data
     passes through virtio-blk DMA (PciIo->Map -> IOMMU bounce buffers), then
     reads the same file from every other volume the firmware has connected
     (NVMe, AHCI, USB, SCSI disks), so that their controllers do DMA too;
     then maps two 512 KiB buffers on the virtio-blk PciIo at once and
     unmaps them (two live bounce buffers of the 1 MiB size class),
  3. optionally maps a buffer holding the canary bytes on the virtio-blk PciIo
     and never unmaps it ("DMA in flight", leak-mapping=1),
  4. optionally starts and initializes every virtio-net SNP, so that their
     rings stay mapped (start-net=1),
  5. optionally calls ExitBootServices() with a stale MapKey first, which must
     fail, then reads the canary again to show that DMA still works
     (stale-mapkey=1),
  6. calls GetMemoryMap() + ExitBootServices(), retrying on
     EFI_INVALID_PARAMETER as the UEFI spec says, and prints the memory
     map the OS is handed,
  7. prints "EBST probe-parked" and parks the CPU with interrupts off.

  Every step prints an "EBST probe ..." trace line (docs/trace-format.md).

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#include <Uefi.h>
#include <Guid/FileInfo.h>
#include <IndustryStandard/Pci22.h>
#include <Library/BaseLib.h>
#include <Library/BaseMemoryLib.h>
#include <Library/CpuLib.h>
#include <Library/DebugLib.h>
#include <Library/DevicePathLib.h>
#include <Library/MemoryAllocationLib.h>
#include <Library/UefiBootServicesTableLib.h>
#include <Library/UefiLib.h>
#include <Protocol/DevicePath.h>
#include <Protocol/LoadedImage.h>
#include <Protocol/PciIo.h>
#include <Protocol/SimpleFileSystem.h>
#include <Protocol/SimpleNetwork.h>

#define PROBE_CONFIG_FILE     L"\\ebs-probe.cfg"
#define PROBE_DEFAULT_CANARY  "canary.bin"
#define PROBE_NAME_MAX        128
#define PROBE_EBS_ATTEMPTS    8

//
// A mapping of this size is served from the IOMMU driver's 1 MiB size class
// of bounce buffers (over 128 KiB, at most 1 MiB), where it has them. The
// class has one slot: of two concurrent mappings, one takes it, and the
// other must not be given it too.
//
#define PROBE_LARGE_MAPPING_BYTES  SIZE_512KB

//
// The longest device path text printed, in characters: short enough that the
// whole "step=canary-device" line fits the 256-byte message buffer of
// BaseDebugLibSerialPort (DEBUG_ON_SERIAL_PORT builds).
//
#define PROBE_PATH_TEXT_MAX  150

typedef struct {
  CHAR16     Canary[PROBE_NAME_MAX];
  BOOLEAN    LeakMapping;
  BOOLEAN    StartNet;
  BOOLEAN    StaleMapKey;
} PROBE_CONFIG;

/**
  Read a whole file from the root directory of a volume.

  @param[in]  Root    The root directory.
  @param[in]  Name    The file path.
  @param[out] Buffer  The file contents, NUL-terminated, from AllocatePool().
  @param[out] Size    The file size in bytes (without the NUL).

  @retval EFI_SUCCESS  The file was read.
  @return              An error from the file system or the allocator.
**/
STATIC
EFI_STATUS
ProbeReadFile (
  IN  EFI_FILE_PROTOCOL  *Root,
  IN  CONST CHAR16       *Name,
  OUT UINT8              **Buffer,
  OUT UINTN              *Size
  )
{
  EFI_STATUS         Status;
  EFI_FILE_PROTOCOL  *File;
  EFI_FILE_INFO      *Info;
  UINTN              InfoSize;
  UINTN              ReadSize;

  Status = Root->Open (Root, &File, (CHAR16 *)Name, EFI_FILE_MODE_READ, 0);
  if (EFI_ERROR (Status)) {
    return Status;
  }

  InfoSize = 0;
  Info     = NULL;
  Status   = File->GetInfo (File, &gEfiFileInfoGuid, &InfoSize, NULL);
  if (Status == EFI_BUFFER_TOO_SMALL) {
    Info = AllocatePool (InfoSize);
    if (Info == NULL) {
      Status = EFI_OUT_OF_RESOURCES;
    } else {
      Status = File->GetInfo (File, &gEfiFileInfoGuid, &InfoSize, Info);
    }
  }

  if (EFI_ERROR (Status)) {
    goto CloseFile;
  }

  ReadSize = (UINTN)Info->FileSize;
  *Buffer  = AllocateZeroPool (ReadSize + 1);
  if (*Buffer == NULL) {
    Status = EFI_OUT_OF_RESOURCES;
    goto CloseFile;
  }

  Status = File->Read (File, &ReadSize, *Buffer);
  if (EFI_ERROR (Status)) {
    FreePool (*Buffer);
    *Buffer = NULL;
    goto CloseFile;
  }

  *Size = ReadSize;

CloseFile:
  if (Info != NULL) {
    FreePool (Info);
  }

  File->Close (File);
  return Status;
}

/**
  Parse "key=value" lines into the configuration. Unknown keys are logged and
  ignored; '#' starts a comment line.

  @param[in]     Text    The NUL-terminated file contents (modified).
  @param[in,out] Config  The configuration to update.
**/
STATIC
VOID
ProbeParseConfig (
  IN     CHAR8         *Text,
  IN OUT PROBE_CONFIG  *Config
  )
{
  CHAR8  *Line;
  CHAR8  *Next;
  CHAR8  *Value;
  UINTN  Length;

  for (Line = Text; *Line != '\0'; Line = Next) {
    for (Next = Line; *Next != '\0' && *Next != '\n'; Next++) {
    }

    if (*Next == '\n') {
      *Next++ = '\0';
    }

    Length = AsciiStrLen (Line);
    while (Length > 0 && (Line[Length - 1] == '\r' || Line[Length - 1] == ' ')) {
      Line[--Length] = '\0';
    }

    if ((Length == 0) || (Line[0] == '#')) {
      continue;
    }

    for (Value = Line; *Value != '\0' && *Value != '='; Value++) {
    }

    if (*Value != '=') {
      DEBUG ((DEBUG_ERROR, "EbsProbe: ignoring config line \"%a\"\n", Line));
      continue;
    }

    *Value++ = '\0';
    if (AsciiStrCmp (Line, "canary") == 0) {
      AsciiStrToUnicodeStrS (Value, Config->Canary, PROBE_NAME_MAX);
    } else if (AsciiStrCmp (Line, "leak-mapping") == 0) {
      Config->LeakMapping = (BOOLEAN)(AsciiStrCmp (Value, "1") == 0);
    } else if (AsciiStrCmp (Line, "start-net") == 0) {
      Config->StartNet = (BOOLEAN)(AsciiStrCmp (Value, "1") == 0);
    } else if (AsciiStrCmp (Line, "stale-mapkey") == 0) {
      Config->StaleMapKey = (BOOLEAN)(AsciiStrCmp (Value, "1") == 0);
    } else {
      DEBUG ((DEBUG_ERROR, "EbsProbe: unknown config key \"%a\"\n", Line));
    }
  }
}

/**
  Describe the device path of a handle as printable ASCII without spaces, for
  a key=value trace line: the text of ConvertDevicePathToText(), with spaces
  replaced by '_' and other characters outside printable ASCII by '?',
  truncated to PROBE_PATH_TEXT_MAX characters.

  @param[in]  Handle    The handle whose device path to describe.
  @param[out] Text      The NUL-terminated description ("unknown" if the handle
                        has no device path or it cannot be converted).
  @param[in]  TextSize  The size of Text in bytes, at least 8.
**/
STATIC
VOID
ProbeDevicePathText (
  IN  EFI_HANDLE  Handle,
  OUT CHAR8       *Text,
  IN  UINTN       TextSize
  )
{
  EFI_STATUS                Status;
  EFI_DEVICE_PATH_PROTOCOL  *DevicePath;
  CHAR16                    *PathText;
  UINTN                     Index;

  PathText = NULL;
  Status   = gBS->HandleProtocol (Handle, &gEfiDevicePathProtocolGuid, (VOID **)&DevicePath);
  if (!EFI_ERROR (Status)) {
    PathText = ConvertDevicePathToText (DevicePath, FALSE, FALSE);
  }

  if (PathText == NULL) {
    AsciiStrCpyS (Text, TextSize, "unknown");
    return;
  }

  //
  // Copy by hand rather than with UnicodeStrToAsciiStrS(), which ASSERTs on
  // a text longer than the buffer and on characters above 0xFF.
  //
  for (Index = 0; Index + 1 < TextSize && PathText[Index] != L'\0'; Index++) {
    if (PathText[Index] == L' ') {
      Text[Index] = '_';
    } else if ((PathText[Index] < L'!') || (PathText[Index] > L'~')) {
      Text[Index] = '?';
    } else {
      Text[Index] = (CHAR8)PathText[Index];
    }
  }

  Text[Index] = '\0';
  FreePool (PathText);
}

/**
  Read the canary file from one volume: at most one byte more than the
  canary, so that a longer file does not match.

  @param[in]  Handle      The handle with the Simple File System protocol.
  @param[in]  CanaryPath  The canary file path, as read from the own volume.
  @param[in]  Canary      The canary bytes read from the own volume.
  @param[in]  CanarySize  Their number.
  @param[out] Bytes       The number of bytes read (0 on an error).
  @param[out] Match       TRUE if they are the canary bytes, and no more.

  @retval EFI_SUCCESS  The file was read (Match says whether it matched).
  @return              An error from the file system or the allocator.
**/
STATIC
EFI_STATUS
ProbeReadCanaryFrom (
  IN  EFI_HANDLE    Handle,
  IN  CONST CHAR16  *CanaryPath,
  IN  CONST UINT8   *Canary,
  IN  UINTN         CanarySize,
  OUT UINTN         *Bytes,
  OUT BOOLEAN       *Match
  )
{
  EFI_STATUS                       Status;
  EFI_SIMPLE_FILE_SYSTEM_PROTOCOL  *FileSystem;
  EFI_FILE_PROTOCOL                *Root;
  EFI_FILE_PROTOCOL                *File;
  UINT8                            *Buffer;
  UINTN                            ReadSize;

  *Bytes = 0;
  *Match = FALSE;

  Status = gBS->HandleProtocol (Handle, &gEfiSimpleFileSystemProtocolGuid, (VOID **)&FileSystem);
  if (EFI_ERROR (Status)) {
    return Status;
  }

  Status = FileSystem->OpenVolume (FileSystem, &Root);
  if (EFI_ERROR (Status)) {
    return Status;
  }

  Status = Root->Open (Root, &File, (CHAR16 *)CanaryPath, EFI_FILE_MODE_READ, 0);
  if (EFI_ERROR (Status)) {
    goto CloseRoot;
  }

  ReadSize = CanarySize + 1;
  Buffer   = AllocateZeroPool (ReadSize);
  if (Buffer == NULL) {
    Status = EFI_OUT_OF_RESOURCES;
    goto CloseFile;
  }

  Status = File->Read (File, &ReadSize, Buffer);
  if (!EFI_ERROR (Status)) {
    *Bytes = ReadSize;
    *Match = (BOOLEAN)(ReadSize == CanarySize &&
                       CompareMem (Buffer, Canary, CanarySize) == 0);
  }

  FreePool (Buffer);

CloseFile:
  File->Close (File);

CloseRoot:
  Root->Close (Root);
  return Status;
}

/**
  Read the canary through every storage device the firmware has connected,
  other than the probe's own volume, so that each of their controllers does
  DMA before ExitBootServices(). Prints a "step=canary-device" line per
  volume and a "step=canary-devices" summary. A volume that cannot be read is
  reported on its line, and is not a probe error.

  @param[in] OwnDevice   The handle of the probe's own volume (skipped).
  @param[in] CanaryPath  The canary file path.
  @param[in] Canary      The canary bytes read from the own volume.
  @param[in] CanarySize  Their number.
**/
STATIC
VOID
ProbeReadOtherVolumes (
  IN EFI_HANDLE    OwnDevice,
  IN CONST CHAR16  *CanaryPath,
  IN CONST UINT8   *Canary,
  IN UINTN         CanarySize
  )
{
  EFI_STATUS  Status;
  EFI_HANDLE  *Handles;
  UINTN       HandleCount;
  UINTN       Index;
  UINTN       Volumes;
  UINTN       Matched;
  UINTN       Bytes;
  BOOLEAN     Match;
  CHAR8       PathText[PROBE_PATH_TEXT_MAX + 1];

  Volumes = 0;
  Matched = 0;
  Status  = gBS->LocateHandleBuffer (
                   ByProtocol,
                   &gEfiSimpleFileSystemProtocolGuid,
                   NULL,
                   &HandleCount,
                   &Handles
                   );
  if (EFI_ERROR (Status)) {
    HandleCount = 0;
    Handles     = NULL;
  }

  for (Index = 0; Index < HandleCount; Index++) {
    if (Handles[Index] == OwnDevice) {
      continue;
    }

    Status = ProbeReadCanaryFrom (
               Handles[Index],
               CanaryPath,
               Canary,
               CanarySize,
               &Bytes,
               &Match
               );
    ProbeDevicePathText (Handles[Index], PathText, sizeof PathText);
    DEBUG ((
      DEBUG_INFO,
      "EBST probe step=canary-device n=%Lu match=%u bytes=%Lu status=0x%Lx path=%a\n",
      (UINT64)Volumes,
      (UINT32)(Match ? 1 : 0),
      (UINT64)Bytes,
      (UINT64)Status,
      PathText
      ));
    Volumes++;
    if (Match) {
      Matched++;
    }
  }

  if (Handles != NULL) {
    FreePool (Handles);
  }

  DEBUG ((
    DEBUG_INFO,
    "EBST probe step=canary-devices count=%Lu matched=%Lu\n",
    (UINT64)Volumes,
    (UINT64)Matched
    ));
}

/**
  Find the PCI I/O protocol of the device behind a volume.

  @param[in]  DeviceHandle  The handle of the volume.
  @param[out] PciIo         The device's PCI I/O protocol.

  @return  The status of the lookup.
**/
STATIC
EFI_STATUS
ProbePciIoOf (
  IN  EFI_HANDLE           DeviceHandle,
  OUT EFI_PCI_IO_PROTOCOL  **PciIo
  )
{
  EFI_STATUS                Status;
  EFI_DEVICE_PATH_PROTOCOL  *DevicePath;
  EFI_HANDLE                PciHandle;

  Status = gBS->HandleProtocol (DeviceHandle, &gEfiDevicePathProtocolGuid, (VOID **)&DevicePath);
  if (!EFI_ERROR (Status)) {
    Status = gBS->LocateDevicePath (&gEfiPciIoProtocolGuid, &DevicePath, &PciHandle);
  }

  if (!EFI_ERROR (Status)) {
    Status = gBS->HandleProtocol (PciHandle, &gEfiPciIoProtocolGuid, (VOID **)PciIo);
  }

  return Status;
}

/**
  Map a buffer holding the canary bytes for the PCI device behind the boot
  volume (virtio-blk), and never unmap it: a DMA transfer still in flight at
  ExitBootServices(). Under an IOMMU the bytes sit in a shared bounce buffer
  until the teardown scrubs it.

  @param[in] DeviceHandle  The handle of the boot volume.
  @param[in] Canary        The canary bytes.
  @param[in] Size          Their number.
**/
STATIC
VOID
ProbeLeakMapping (
  IN EFI_HANDLE   DeviceHandle,
  IN CONST UINT8  *Canary,
  IN UINTN        Size
  )
{
  EFI_STATUS            Status;
  EFI_PCI_IO_PROTOCOL   *PciIo;
  VOID                  *Buffer;
  UINTN                 Bytes;
  EFI_PHYSICAL_ADDRESS  DeviceAddress;
  VOID                  *Mapping;

  Buffer  = NULL;
  Mapping = NULL;
  Bytes   = Size;
  Status  = ProbePciIoOf (DeviceHandle, &PciIo);
  if (!EFI_ERROR (Status)) {
    Buffer = AllocatePages (EFI_SIZE_TO_PAGES (Size));
    if (Buffer == NULL) {
      Status = EFI_OUT_OF_RESOURCES;
    }
  }

  if (!EFI_ERROR (Status)) {
    CopyMem (Buffer, Canary, Size);
    Status = PciIo->Map (
                      PciIo,
                      EfiPciIoOperationBusMasterRead,
                      Buffer,
                      &Bytes,
                      &DeviceAddress,
                      &Mapping
                      );
  }

  if (EFI_ERROR (Status)) {
    DeviceAddress = 0;
  }

  DEBUG ((
    DEBUG_INFO,
    "EBST probe step=leak map=0x%p host=0x%p dev=0x%Lx bytes=%Lu status=0x%Lx\n",
    Mapping,
    Buffer,
    DeviceAddress,
    (UINT64)Bytes,
    (UINT64)Status
    ));
}

/**
  Map two buffers of PROBE_LARGE_MAPPING_BYTES for the PCI device behind the
  boot volume, both live at once, then unmap and free them: two concurrent
  transfers in the size class of the IOMMU driver's 1 MiB bounce buffers. The
  IOMMU driver's trace lines give their device addresses, which must not
  share a page.

  @param[in] DeviceHandle  The handle of the boot volume.
**/
STATIC
VOID
ProbeLargeMappings (
  IN EFI_HANDLE  DeviceHandle
  )
{
  EFI_STATUS            Status[2];
  EFI_PCI_IO_PROTOCOL   *PciIo;
  VOID                  *Buffer[2];
  UINTN                 Bytes[2];
  EFI_PHYSICAL_ADDRESS  DeviceAddress[2];
  VOID                  *Mapping[2];
  UINTN                 Index;
  EFI_STATUS            Found;

  PciIo = NULL;
  Found = ProbePciIoOf (DeviceHandle, &PciIo);

  for (Index = 0; Index < 2; Index++) {
    Mapping[Index]       = NULL;
    DeviceAddress[Index] = 0;
    Bytes[Index]         = 0;
    Buffer[Index]        = AllocatePages (EFI_SIZE_TO_PAGES (PROBE_LARGE_MAPPING_BYTES));
    Status[Index]        = Found;
    if (Buffer[Index] == NULL) {
      Status[Index] = EFI_OUT_OF_RESOURCES;
    }

    if (!EFI_ERROR (Status[Index])) {
      Bytes[Index]  = PROBE_LARGE_MAPPING_BYTES;
      Status[Index] = PciIo->Map (
                               PciIo,
                               EfiPciIoOperationBusMasterRead,
                               Buffer[Index],
                               &Bytes[Index],
                               &DeviceAddress[Index],
                               &Mapping[Index]
                               );
    }
  }

  DEBUG ((
    DEBUG_INFO,
    "EBST probe step=large-maps bytes=%Lu dev0=0x%Lx bytes0=%Lu status0=0x%Lx dev1=0x%Lx bytes1=%Lu status1=0x%Lx\n",
    (UINT64)PROBE_LARGE_MAPPING_BYTES,
    DeviceAddress[0],
    (UINT64)Bytes[0],
    (UINT64)Status[0],
    DeviceAddress[1],
    (UINT64)Bytes[1],
    (UINT64)Status[1]
    ));

  for (Index = 0; Index < 2; Index++) {
    if (!EFI_ERROR (Status[Index]) && EFI_ERROR (PciIo->Unmap (PciIo, Mapping[Index]))) {
      //
      // Still mapped: a device may read it, so leave the buffer allocated.
      //
      continue;
    }

    if (Buffer[Index] != NULL) {
      FreePages (Buffer[Index], EFI_SIZE_TO_PAGES (PROBE_LARGE_MAPPING_BYTES));
    }
  }
}

/**
  Start and initialize every Simple Network Protocol instance (virtio-net),
  so that their receive and transmit rings are mapped at ExitBootServices().
**/
STATIC
VOID
ProbeStartNetwork (
  VOID
  )
{
  EFI_STATUS                   Status;
  EFI_HANDLE                   *Handles;
  UINTN                        Count;
  UINTN                        Index;
  UINTN                        Up;
  EFI_SIMPLE_NETWORK_PROTOCOL  *Snp;
  EFI_PCI_IO_PROTOCOL          *PciIo;
  UINT8                        BaseClass;

  //
  // OVMF's BDS connects only the devices in QEMU's boot order: connect the
  // network controllers here, so that virtio-net produces its SNP.
  //
  Status = gBS->LocateHandleBuffer (ByProtocol, &gEfiPciIoProtocolGuid, NULL, &Count, &Handles);
  if (!EFI_ERROR (Status)) {
    for (Index = 0; Index < Count; Index++) {
      Status = gBS->HandleProtocol (Handles[Index], &gEfiPciIoProtocolGuid, (VOID **)&PciIo);
      if (EFI_ERROR (Status)) {
        continue;
      }

      Status = PciIo->Pci.Read (PciIo, EfiPciIoWidthUint8, PCI_CLASSCODE_OFFSET + 2, 1, &BaseClass);
      if (!EFI_ERROR (Status) && (BaseClass == PCI_CLASS_NETWORK)) {
        gBS->ConnectController (Handles[Index], NULL, NULL, TRUE);
      }
    }

    FreePool (Handles);
  }

  Up     = 0;
  Count  = 0;
  Status = gBS->LocateHandleBuffer (ByProtocol, &gEfiSimpleNetworkProtocolGuid, NULL, &Count, &Handles);
  if (EFI_ERROR (Status)) {
    Count = 0;
  }

  for (Index = 0; Index < Count; Index++) {
    Status = gBS->HandleProtocol (Handles[Index], &gEfiSimpleNetworkProtocolGuid, (VOID **)&Snp);
    if (EFI_ERROR (Status)) {
      continue;
    }

    if (Snp->Mode->State == EfiSimpleNetworkStopped) {
      Snp->Start (Snp);
    }

    if (Snp->Mode->State == EfiSimpleNetworkStarted) {
      Snp->Initialize (Snp, 0, 0);
    }

    if (Snp->Mode->State == EfiSimpleNetworkInitialized) {
      Up++;
    }
  }

  if (Count > 0) {
    FreePool (Handles);
  }

  DEBUG ((
    DEBUG_INFO,
    "EBST probe step=start-net handles=%Lu initialized=%Lu\n",
    (UINT64)Count,
    (UINT64)Up
    ));
}

/**
  Call ExitBootServices() with a MapKey that is stale on purpose: it must fail
  with EFI_INVALID_PARAMETER, and the IOMMU teardown must not run.

  @param[in] ImageHandle  This image.

  @return  What ExitBootServices() returned.
**/
STATIC
EFI_STATUS
ProbeStaleExitBootServices (
  IN EFI_HANDLE  ImageHandle
  )
{
  EFI_STATUS             Status;
  UINTN                  MapSize;
  EFI_MEMORY_DESCRIPTOR  *Map;
  UINTN                  MapKey;
  UINTN                  DescriptorSize;
  UINT32                 DescriptorVersion;
  VOID                   *Page;

  MapSize = 0;
  MapKey  = 0;
  Map     = NULL;
  Status  = gBS->GetMemoryMap (&MapSize, NULL, &MapKey, &DescriptorSize, &DescriptorVersion);
  if (Status == EFI_BUFFER_TOO_SMALL) {
    MapSize += 16 * DescriptorSize;
    Map      = AllocatePool (MapSize);
    if (Map != NULL) {
      Status = gBS->GetMemoryMap (&MapSize, Map, &MapKey, &DescriptorSize, &DescriptorVersion);
    }
  }

  //
  // Change the memory map after taking its key, so that the key is stale.
  //
  Page = AllocatePages (1);
  if (Page != NULL) {
    FreePages (Page, 1);
  }

  Status = gBS->ExitBootServices (ImageHandle, MapKey);
  DEBUG ((DEBUG_INFO, "EBST probe step=stale-ebs status=0x%Lx\n", (UINT64)Status));
  if (!EFI_ERROR (Status)) {
    return Status;
  }

  if (Map != NULL) {
    FreePool (Map);
  }

  return Status;
}

/**
  Print the memory map that ExitBootServices() took, one "step=memmap" line
  per descriptor, then a "step=memmap-end" line with their count, so that a
  cut log shows: what the OS is handed, and in which state (under SEV-SNP,
  every page of a type the OS uses must be validated). Boot services are
  gone: DEBUG () only, which formats into a stack buffer and writes the debug
  (or serial) port.

  @param[in] Map             The memory map.
  @param[in] MapSize         Its size in bytes.
  @param[in] DescriptorSize  The size of one descriptor.
**/
STATIC
VOID
ProbeReportMemoryMap (
  IN CONST EFI_MEMORY_DESCRIPTOR  *Map,
  IN UINTN                        MapSize,
  IN UINTN                        DescriptorSize
  )
{
  CONST EFI_MEMORY_DESCRIPTOR  *Desc;
  CONST EFI_MEMORY_DESCRIPTOR  *End;
  UINT64                       Count;

  if (DescriptorSize < sizeof (EFI_MEMORY_DESCRIPTOR)) {
    DEBUG ((DEBUG_INFO, "EBST probe step=memmap-end count=0 desc-size=%Lu\n", (UINT64)DescriptorSize));
    return;
  }

  Count = 0;
  End   = (CONST EFI_MEMORY_DESCRIPTOR *)((CONST UINT8 *)Map + MapSize);
  for (Desc = Map; Desc < End; Desc = NEXT_MEMORY_DESCRIPTOR (Desc, DescriptorSize)) {
    DEBUG ((
      DEBUG_INFO,
      "EBST probe step=memmap type=%u start=0x%Lx pages=0x%Lx\n",
      Desc->Type,
      Desc->PhysicalStart,
      Desc->NumberOfPages
      ));
    Count++;
  }

  DEBUG ((
    DEBUG_INFO,
    "EBST probe step=memmap-end count=%Lu desc-size=%Lu\n",
    Count,
    (UINT64)DescriptorSize
    ));
}

/**
  Exit boot services for good: GetMemoryMap() + ExitBootServices(), retried on
  EFI_INVALID_PARAMETER as the UEFI spec says (only GetMemoryMap() is called
  between attempts, into the buffer allocated before the first). Once it
  succeeds, print the memory map it took (ProbeReportMemoryMap ()).

  @param[in] ImageHandle  This image.

  @return  What the last ExitBootServices() returned.
**/
STATIC
EFI_STATUS
ProbeExitBootServices (
  IN EFI_HANDLE  ImageHandle
  )
{
  EFI_STATUS             Status;
  UINTN                  BufferSize;
  UINTN                  MapSize;
  EFI_MEMORY_DESCRIPTOR  *Map;
  UINTN                  MapKey;
  UINTN                  DescriptorSize;
  UINT32                 DescriptorVersion;
  UINTN                  Attempt;

  MapSize = 0;
  Status  = gBS->GetMemoryMap (&MapSize, NULL, &MapKey, &DescriptorSize, &DescriptorVersion);
  if (Status != EFI_BUFFER_TOO_SMALL) {
    return Status;
  }

  //
  // Room for the descriptors that this allocation itself adds, and more.
  //
  BufferSize = MapSize + 32 * DescriptorSize;
  Map        = AllocatePool (BufferSize);
  if (Map == NULL) {
    return EFI_OUT_OF_RESOURCES;
  }

  for (Attempt = 1; Attempt <= PROBE_EBS_ATTEMPTS; Attempt++) {
    MapSize = BufferSize;
    Status  = gBS->GetMemoryMap (&MapSize, Map, &MapKey, &DescriptorSize, &DescriptorVersion);
    if (EFI_ERROR (Status)) {
      return Status;
    }

    Status = gBS->ExitBootServices (ImageHandle, MapKey);
    if (Status != EFI_INVALID_PARAMETER) {
      break;
    }
  }

  if (!EFI_ERROR (Status)) {
    ProbeReportMemoryMap (Map, MapSize, DescriptorSize);
  }

  return Status;
}

#define PROBE_CPUID_MAX_EXTENDED  0x80000000
#define PROBE_CPUID_MEM_ENCRYPT   0x8000001F
#define PROBE_CPUID_SEV_BIT       BIT1
#define PROBE_MSR_SEV_STATUS      0xC0010131

/**
  Print the memory encryption the platform offers, as this guest sees it:
  CPUID 0x8000001F EAX/EBX (SEV bit, C-bit position, physical address bits
  lost) and, only where that leaf says SEV (the MSR does not exist on other
  processors), the SEV_STATUS MSR.
**/
STATIC
VOID
ProbeReportCpu (
  VOID
  )
{
  UINT32  MaxLeaf;
  UINT32  Eax;
  UINT32  Ebx;
  UINT64  SevStatus;
  UINT32  HaveMsr;

  AsmCpuid (PROBE_CPUID_MAX_EXTENDED, &MaxLeaf, NULL, NULL, NULL);
  Eax = 0;
  Ebx = 0;
  if (MaxLeaf >= PROBE_CPUID_MEM_ENCRYPT) {
    AsmCpuid (PROBE_CPUID_MEM_ENCRYPT, &Eax, &Ebx, NULL, NULL);
  }

  SevStatus = 0;
  HaveMsr   = 0;
  if ((Eax & PROBE_CPUID_SEV_BIT) != 0) {
    SevStatus = AsmReadMsr64 (PROBE_MSR_SEV_STATUS);
    HaveMsr   = 1;
  }

  DEBUG ((
    DEBUG_INFO,
    "EBST probe step=cpu max-leaf=0x%x leaf-eax=0x%x leaf-ebx=0x%x cbitpos=%u sev-msr=%u sev-status=0x%Lx\n",
    MaxLeaf,
    Eax,
    Ebx,
    Ebx & 0x3F,
    HaveMsr,
    SevStatus
    ));
}

/**
  Stop here for good, with interrupts off, so that the host can dump guest
  memory in the state the OS would have found it.
**/
STATIC
VOID
ProbePark (
  VOID
  )
{
  DisableInterrupts ();
  for ( ; ; ) {
    CpuSleep ();
  }
}

/**
  The entry point.

  @param[in] ImageHandle  This image.
  @param[in] SystemTable  The system table.

  @return  An error if a step before ExitBootServices() failed; the function
           does not return after ExitBootServices() has succeeded.
**/
EFI_STATUS
EFIAPI
EbsProbeMain (
  IN EFI_HANDLE        ImageHandle,
  IN EFI_SYSTEM_TABLE  *SystemTable
  )
{
  EFI_STATUS                       Status;
  EFI_LOADED_IMAGE_PROTOCOL        *LoadedImage;
  EFI_SIMPLE_FILE_SYSTEM_PROTOCOL  *FileSystem;
  EFI_FILE_PROTOCOL                *Root;
  PROBE_CONFIG                     Config;
  CHAR16                           CanaryPath[PROBE_NAME_MAX + 1];
  UINT8                            *Text;
  UINTN                            TextSize;
  UINT8                            *Canary;
  UINTN                            CanarySize;
  UINT8                            *Again;
  UINTN                            AgainSize;
  BOOLEAN                          Same;

  DEBUG ((DEBUG_INFO, "EBST version v=1 module=EbsProbe\n"));
  ProbeReportCpu ();

  ZeroMem (&Config, sizeof Config);
  AsciiStrToUnicodeStrS (PROBE_DEFAULT_CANARY, Config.Canary, PROBE_NAME_MAX);

  Status = gBS->HandleProtocol (ImageHandle, &gEfiLoadedImageProtocolGuid, (VOID **)&LoadedImage);
  if (!EFI_ERROR (Status)) {
    Status = gBS->HandleProtocol (
                    LoadedImage->DeviceHandle,
                    &gEfiSimpleFileSystemProtocolGuid,
                    (VOID **)&FileSystem
                    );
  }

  if (!EFI_ERROR (Status)) {
    Status = FileSystem->OpenVolume (FileSystem, &Root);
  }

  if (EFI_ERROR (Status)) {
    DEBUG ((DEBUG_INFO, "EBST probe step=error what=volume status=0x%Lx\n", (UINT64)Status));
    return Status;
  }

  Status = ProbeReadFile (Root, PROBE_CONFIG_FILE, &Text, &TextSize);
  if (!EFI_ERROR (Status)) {
    ProbeParseConfig ((CHAR8 *)Text, &Config);
    FreePool (Text);
  }

  DEBUG ((
    DEBUG_INFO,
    "EBST probe step=config found=%u canary=%s leak-mapping=%u start-net=%u stale-mapkey=%u\n",
    (UINT32)(EFI_ERROR (Status) ? 0 : 1),
    Config.Canary,
    (UINT32)Config.LeakMapping,
    (UINT32)Config.StartNet,
    (UINT32)Config.StaleMapKey
    ));

  CanaryPath[0] = L'\\';
  StrCpyS (CanaryPath + 1, PROBE_NAME_MAX, Config.Canary);
  Status = ProbeReadFile (Root, CanaryPath, &Canary, &CanarySize);
  if (EFI_ERROR (Status)) {
    DEBUG ((DEBUG_INFO, "EBST probe step=error what=canary status=0x%Lx\n", (UINT64)Status));
    return Status;
  }

  DEBUG ((DEBUG_INFO, "EBST probe step=canary-read bytes=%Lu\n", (UINT64)CanarySize));

  //
  // This frees all it allocates, before the steps below take a memory map.
  //
  ProbeReadOtherVolumes (LoadedImage->DeviceHandle, CanaryPath, Canary, CanarySize);
  ProbeLargeMappings (LoadedImage->DeviceHandle);

  if (Config.LeakMapping) {
    ProbeLeakMapping (LoadedImage->DeviceHandle, Canary, CanarySize);
  }

  if (Config.StartNet) {
    ProbeStartNetwork ();
  }

  if (Config.StaleMapKey) {
    Status = ProbeStaleExitBootServices (ImageHandle);
    if (!EFI_ERROR (Status)) {
      //
      // The stale key was accepted after all: boot services are gone.
      //
      DEBUG ((DEBUG_INFO, "EBST probe-parked\n"));
      ProbePark ();
    }

    //
    // DMA must still work after the failed attempt: read the canary again.
    //
    Status = ProbeReadFile (Root, CanaryPath, &Again, &AgainSize);
    Same   = (BOOLEAN)(!EFI_ERROR (Status) && AgainSize == CanarySize &&
                       CompareMem (Again, Canary, CanarySize) == 0);
    DEBUG ((DEBUG_INFO, "EBST probe step=recheck ok=%u\n", (UINT32)(Same ? 1 : 0)));
    if (!EFI_ERROR (Status)) {
      FreePool (Again);
    }
  }

  Root->Close (Root);
  DEBUG ((DEBUG_INFO, "EBST probe step=exit-boot-services\n"));
  Status = ProbeExitBootServices (ImageHandle);
  if (EFI_ERROR (Status)) {
    DEBUG ((DEBUG_INFO, "EBST probe step=error what=ebs status=0x%Lx\n", (UINT64)Status));
    return Status;
  }

  //
  // Boot services are gone. DEBUG () only formats into a stack buffer and
  // writes the debug port (or the serial port in a DEBUG_ON_SERIAL_PORT
  // build), so it is still safe; nothing else from here on may use a boot
  // service.
  //
  DEBUG ((DEBUG_INFO, "EBST probe-parked\n"));
  ProbePark ();
  return EFI_SUCCESS;
}
