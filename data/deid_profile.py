"""The attribute table of the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile (Table E.1-1).

Actions (PS3.15 E.1.1): ``X`` remove, ``Z`` replace with a zero-length value, ``D`` replace with a dummy value
valid for the VR, ``U`` replace the UID with a consistent new one, ``K`` keep. Where the standard offers a choice
("X/Z/D") the strictest action that keeps the object valid is taken, which is usually ``X``. ``PatientName`` and
``PatientID`` are ``Z`` in the standard; here they get a keyed pseudonym (``D``, allowed by the Z definition)
so that one patient's images stay grouped.

Attributes this table does not list are handled by VR in :mod:`covtoken.data.deid`: dates and times (DA, DT,
TM) are shifted or removed, person names (PN) and free text (LT, ST, UT) are removed, instance UIDs (UI values
that are not registered DICOM UIDs) are remapped, private tags and curve/overlay groups are removed, the rest is
kept. That is stricter than the standard, which keeps unlisted attributes.
"""
from __future__ import annotations

import functools
from enum import Enum
from typing import Mapping

from pydicom.datadict import tag_for_keyword

__all__ = ["Action", "PROFILE_KEYWORDS", "DATE_Z_KEYWORDS", "CLASS_UID_KEYWORDS", "profile_by_tag"]


class Action(str, Enum):
    """PS3.15 E.1.1 action codes."""

    REMOVE = "X"
    EMPTY = "Z"
    DUMMY = "D"
    UID = "U"
    KEEP = "K"


_X = """
AcquisitionComments AcquisitionContextSequence AcquisitionDeviceProcessingDescription AcquisitionProtocolDescription
ActualHumanPerformersSequence AdditionalPatientHistory AdmissionID AdmittingDate AdmittingDiagnosesCodeSequence
AdmittingDiagnosesDescription AdmittingTime Allergies Arbitrary AuthorObserverSequence BranchOfService CassetteID
CommentsOnThePerformedProcedureStep ConfidentialityConstraintOnPatientDataDescription
ConsultingPhysicianName ContentCreatorIdentificationCodeSequence ContentSequence ContributionDescription
CountryOfResidence CurrentPatientLocation CustodialOrganizationSequence DataSetTrailingPadding DerivationDescription
DetectorID DeviceSerialNumber DigitalSignaturesSequence DischargeDiagnosisDescription DistributionAddress
DistributionName EthnicGroup FrameComments GantryID GeneratorID HumanPerformerName HumanPerformerOrganization
IconImageSequence IdentifyingComments ImageComments ImagePresentationComments ImagingServiceRequestComments
Impressions InstitutionAddress InstitutionCodeSequence InstitutionName InstitutionalDepartmentName
InsurancePlanIdentification IntendedRecipientsOfResultsIdentificationSequence InterpretationApproverSequence
InterpretationAuthor InterpretationDiagnosisDescription InterpretationIDIssuer InterpretationRecorder
InterpretationText InterpretationTranscriber IssuerOfAdmissionID IssuerOfPatientID IssuerOfServiceEpisodeID
LastMenstrualDate MedicalAlerts MedicalRecordLocator MilitaryRank ModifiedAttributesSequence ModifyingDeviceID
ModifyingDeviceManufacturer NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults Occupation
OperatorIdentificationSequence OperatorsName OrderCallbackPhoneNumber OrderEnteredBy OrderEntererLocation
OriginalAttributesSequence OtherPatientIDs OtherPatientIDsSequence OtherPatientNames ParticipantSequence
PatientAddress PatientAge PatientBirthName PatientBirthTime PatientComments PatientInstitutionResidence
PatientInsurancePlanCodeSequence PatientMotherBirthName PatientPrimaryLanguageCodeSequence
PatientReligiousPreference PatientSexNeutered PatientSize PatientState PatientTelephoneNumbers
PatientTransportArrangements PatientWeight PerformedLocation PerformedProcedureStepDescription
PerformedProcedureStepEndDate PerformedProcedureStepEndTime PerformedProcedureStepID
PerformedProcedureStepStartDate PerformedProcedureStepStartTime PerformedStationAETitle
PerformedStationGeographicLocationCodeSequence PerformedStationName PerformedStationNameCodeSequence
PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress PersonName PersonTelephoneNumbers
PhysicianApprovingInterpretation PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence
PhysiciansReadingStudyIdentificationSequence PlateID PreMedication PregnancyStatus ProtocolName
ReasonForStudy ReasonForTheImagingServiceRequest ReferencedPatientAliasSequence ReferencedPatientSequence
ReferencedPerformedProcedureStepSequence ReferencedStudySequence ReferringPhysicianAddress
ReferringPhysicianIdentificationSequence ReferringPhysicianTelephoneNumbers RegionOfResidence
RequestAttributesSequence RequestedContrastAgent RequestedProcedureComments RequestedProcedureDescription
RequestedProcedureID RequestedProcedureLocation RequestingPhysician RequestingService ResponsibleOrganization
ResponsiblePerson ResultsComments ResultsDistributionListSequence ResultsIDIssuer ScheduledHumanPerformersSequence
ScheduledPatientInstitutionResidence ScheduledPerformingPhysicianIdentificationSequence
ScheduledPerformingPhysicianName ScheduledProcedureStepDescription ScheduledProcedureStepEndDate
ScheduledProcedureStepEndTime ScheduledProcedureStepLocation ScheduledProcedureStepStartDate
ScheduledProcedureStepStartTime ScheduledStationAETitle ScheduledStationGeographicLocationCodeSequence
ScheduledStationName ScheduledStationNameCodeSequence ScheduledStudyLocation ScheduledStudyLocationAETitle
SeriesDescription ServiceEpisodeDescription ServiceEpisodeID SmokingStatus SpecialNeeds StationName StudyComments
StudyDescription StudyIDIssuer TextComments TextString TimezoneOffsetFromUTC TopicAuthor TopicKeywords TopicSubject
TopicTitle VerifyingObserverName VerifyingObserverSequence VerifyingOrganization VisitComments
SourceApplicationEntityTitle SendingApplicationEntityTitle ReceivingApplicationEntityTitle
PrivateInformationCreatorUID PrivateInformation
"""

_Z = """
AccessionNumber ContrastBolusAgent FillerOrderNumberImagingServiceRequest PatientBirthDate PatientSex
PlacerOrderNumberImagingServiceRequest ReferringPhysicianName StudyID VerifyingObserverIdentificationCodeSequence
"""

#: Pseudonymised with a keyed hash instead of emptied (allowed by the Z definition).
_D = "PatientName PatientID"

_U = """
StudyInstanceUID SeriesInstanceUID SOPInstanceUID MediaStorageSOPInstanceUID FrameOfReferenceUID
SynchronizationFrameOfReferenceUID ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile InstanceCreatorUID
IrradiationEventUID StorageMediaFileSetUID ConcatenationUID DimensionOrganizationUID ReferencedFrameOfReferenceUID
RelatedFrameOfReferenceUID ObservationUID UID PaletteColorLookupTableUID LargePaletteColorLookupTableUID
FailedSOPInstanceUIDList TransactionUID ReferencedGeneralPurposeScheduledProcedureStepTransactionUID
TemplateExtensionCreatorUID TemplateExtensionOrganizationUID FiducialUID DeviceUID DoseReferenceUID
CreatorVersionUID SpecimenUID TargetUID
"""

#: UIDs naming classes, syntaxes and coding schemes, never instances: kept even when not in pydicom's registry.
_CLASS_UIDS = """
SOPClassUID MediaStorageSOPClassUID ReferencedSOPClassUID ReferencedSOPClassUIDInFile TransferSyntaxUID
ReferencedTransferSyntaxUIDInFile ImplementationClassUID CodingSchemeUID ContextGroupExtensionCreatorUID
"""

PROFILE_KEYWORDS: Mapping[str, Action] = {
    **{k: Action.REMOVE for k in _X.split()},
    **{k: Action.EMPTY for k in _Z.split()},
    **{k: Action.DUMMY for k in _D.split()},
    **{k: Action.UID for k in _U.split()},
    **{k: Action.KEEP for k in _CLASS_UIDS.split()},
}

#: Type 2 study-level dates and times: emptied (not removed) when dates are not shifted.
DATE_Z_KEYWORDS: frozenset[str] = frozenset({"StudyDate", "StudyTime", "ContentDate", "ContentTime"})

CLASS_UID_KEYWORDS: frozenset[str] = frozenset(_CLASS_UIDS.split())


@functools.cache
def profile_by_tag() -> Mapping[int, Action]:
    """The profile keyed by tag.

    Returns:
        ``{tag: action}`` for every keyword in :data:`PROFILE_KEYWORDS`.

    Raises:
        KeyError: a keyword that pydicom's data dictionary does not know (a typo in the table).
    """
    out: dict[int, Action] = {}
    for kw, action in PROFILE_KEYWORDS.items():
        tag = tag_for_keyword(kw)
        if tag is None:
            raise KeyError(f"de-identification profile names unknown DICOM keyword {kw!r}")
        out[int(tag)] = action
    return out
