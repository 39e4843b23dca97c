/* The edge cases of the static C3 check that the recorded IoMmuDxe modules
   do not have, compiled by tests/unit/test_teardown_static.py with the host's
   gcc (edk2's GCC X64 flags where they matter: -fno-omit-frame-pointer,
   -mno-red-zone, ms_abi services) and checked from Teardown() and Unlocked().
   The tables have the UEFI layout (24-byte header, 8-byte pointers). */

typedef struct { char Hdr[24]; void *Fn[44]; } EFI_BOOT_SERVICES;
typedef struct {
  char Hdr[24]; void *FirmwareVendor; unsigned FirmwareRevision;
  void *ConsoleInHandle, *ConIn, *ConsoleOutHandle, *ConOut, *StandardErrorHandle, *StdErr;
  void *RuntimeServices; EFI_BOOT_SERVICES *BootServices;
} EFI_SYSTEM_TABLE;
typedef void (__attribute__((ms_abi)) *SERVICE)(void);

EFI_SYSTEM_TABLE *gST;
EFI_BOOT_SERVICES *gBS;
SERVICE volatile mCallback;
volatile int mSink;

#define NOIPA __attribute__((noipa))
#define SERVICE_AT(Table, Offset) (*(SERVICE *)((char *)(Table) + (Offset)))

/* gST->BootServices, then a member: RaiseTPL (0x18). */
NOIPA void ViaSystemTable (void) { SERVICE_AT (gST->BootServices, 0x18) (); }

/* gBS kept in a stack slot across a loop (no optimisation: every value spilled). */
__attribute__((noipa, optimize ("O0"))) void Spilled (int Count)
{
  EFI_BOOT_SERVICES *Bs = gBS;
  for (int Index = 0; Index < Count; Index++) mSink++;
  SERVICE_AT (Bs, 0x40) ();                     /* AllocatePool */
}

NOIPA void FreeIt (void) { SERVICE_AT (gBS, 0x48) (); }   /* FreePool */
/* A tail call: jmp FreeIt. */
NOIPA void TailToFree (void) { FreeIt (); }

NOIPA void Callback (void) { mCallback (); }

/* gBS read before a call, kept in a callee-saved register, used after it. */
NOIPA void Other (void) { mSink++; }
NOIPA void AcrossCall (void)
{
  EFI_BOOT_SERVICES *Bs = gBS;
  Other ();
  SERVICE_AT (Bs, 0x98) ();                     /* HandleProtocol */
}

NOIPA void Guarded (int Locked) { if (!Locked) SERVICE_AT (gBS, 0x30) (); }  /* FreePages */

void Teardown (void)
{
  ViaSystemTable ();
  Spilled (3);
  TailToFree ();
  Callback ();
  AcrossCall ();
  Guarded (1);
}

void Unlocked (void) { Guarded (0); }

/* One allocation, two ways to it: through a call a guard covers (the
   shorter way) and through calls none covers. */
NOIPA void Sink (void) { SERVICE_AT (gBS, 0x28) (); }   /* AllocatePages */
NOIPA void Shield (void) { Sink (); }
NOIPA void Middle (void) { Sink (); }
NOIPA void Around (void) { Middle (); }
void GuardedOnly (void) { Shield (); }
void GuardedAndNot (void) { Shield (); Around (); }
