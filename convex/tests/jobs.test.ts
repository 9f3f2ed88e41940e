// The four job mutations klipstream/integrations/convex.py calls (video:upsertJobProgress,
// video:markCompleted, video:markFailed, video:markCancelled): what each one writes to the row.
import { getFunctionName } from "convex/server";
import { describe, expect, test } from "vitest";
import {
  CREATED,
  JOB,
  TWITCH_ID,
  allVideos,
  api,
  cancelledArgs,
  completedArgs,
  failedArgs,
  progressArgs,
  setup,
  videoRow,
} from "./harness.setup";

const STARTED = CREATED + 2_000;
const URLS_PARTIAL = {
  video_url: "https://storage.test/klipstream-vods-raw/2345678901/2345678901.mp4",
  audio_url: "https://storage.test/klipstream-vods-raw/2345678901/audio_2345678901.mp3",
};
const URLS_ALL = {
  ...URLS_PARTIAL,
  waveform_url: "https://storage.test/w.json",
  audiowaveUrl: "https://storage.test/w.json",
  transcript_url: "https://storage.test/segments.csv",
  transcriptUrl: "https://storage.test/segments.csv",
  chat_url: "https://storage.test/chat.csv",
  chatUrl: "https://storage.test/chat.csv",
};

test("the function paths are the ones the service calls", () => {
  expect(getFunctionName(api.video.upsertJobProgress)).toBe("video:upsertJobProgress");
  expect(getFunctionName(api.video.markCompleted)).toBe("video:markCompleted");
  expect(getFunctionName(api.video.markFailed)).toBe("video:markFailed");
  expect(getFunctionName(api.video.markCancelled)).toBe("video:markCancelled");
});

describe("upsertJobProgress", () => {
  test("creates the row for an unknown video with every job field", async () => {
    const t = setup();
    const result = await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(CREATED + 3_000, "Downloading", 7.5, {
        processingStartedAt: STARTED,
        estimatedCompletionSeconds: 840,
        title: "Friday stream",
        urls: URLS_PARTIAL,
        retryCount: 1,
      }),
    );
    expect(result).toEqual({ applied: true });
    const rows = await allVideos(t);
    expect(rows).toHaveLength(1);
    const { _id, _creationTime, ...fields } = rows[0]!;
    expect(fields).toEqual({
      twitchId: TWITCH_ID,
      title: "Friday stream",
      status: "Downloading",
      currentStage: "Downloading",
      progressPercentage: 7.5,
      estimatedCompletionSeconds: 840,
      jobId: JOB,
      retryCount: 1,
      createdAt: CREATED,
      updatedAt: CREATED + 3_000,
      processingStartedAt: STARTED,
      ...URLS_PARTIAL,
    });
  });

  test("a queued job (no start time, no ETA, no title, no URLs) writes just the job fields", async () => {
    const t = setup();
    await t.mutation(api.video.upsertJobProgress, progressArgs(CREATED, "Queued", 0));
    const row = await videoRow(t, TWITCH_ID);
    const { _id, _creationTime, ...fields } = row!;
    expect(fields).toEqual({
      twitchId: TWITCH_ID,
      status: "Queued",
      currentStage: "Queued",
      progressPercentage: 0,
      jobId: JOB,
      retryCount: 0,
      createdAt: CREATED,
      updatedAt: CREATED,
    });
  });

  test("later progress updates the same row: new values, ETA cleared when absent, title and URLs kept", async () => {
    const t = setup();
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(CREATED + 3_000, "Downloading", 10, {
        processingStartedAt: STARTED,
        estimatedCompletionSeconds: 600,
        title: "Friday stream",
        urls: URLS_PARTIAL,
      }),
    );
    const first = await videoRow(t, TWITCH_ID);
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(CREATED + 9_000, "Transcribing", 42.25, {
        processingStartedAt: STARTED,
        urls: {
          chat_url: "https://storage.test/chat.csv",
          chatUrl: "https://storage.test/chat.csv",
        },
      }),
    );
    const rows = await allVideos(t);
    expect(rows).toHaveLength(1);
    expect(rows[0]!._id).toBe(first!._id);
    expect(rows[0]).toMatchObject({
      status: "Transcribing",
      currentStage: "Transcribing",
      progressPercentage: 42.25,
      updatedAt: CREATED + 9_000,
      title: "Friday stream",
      ...URLS_PARTIAL,
      chat_url: "https://storage.test/chat.csv",
      chatUrl: "https://storage.test/chat.csv",
    });
    expect(rows[0]).not.toHaveProperty("estimatedCompletionSeconds");
  });

  test("updates an existing row the old system created, keeping its id and other fields", async () => {
    const t = setup();
    const id = await t.run(
      async (ctx) =>
        await ctx.db.insert("videos", {
          twitchId: TWITCH_ID,
          status: "Finalizing analysis",
          title: "Old title",
          transcriptUrl: "https://old.test/t.csv",
        }),
    );
    await t.mutation(api.video.upsertJobProgress, progressArgs(CREATED, "Queued", 0));
    const rows = await allVideos(t);
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({
      _id: id,
      status: "Queued",
      jobId: JOB,
      title: "Old title",
      transcriptUrl: "https://old.test/t.csv",
    });
  });

  test("different videos get different rows", async () => {
    const t = setup();
    await t.mutation(api.video.upsertJobProgress, progressArgs(CREATED, "Queued", 0));
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(CREATED, "Queued", 0, { twitchId: "1111111111", jobId: "job_02" }),
    );
    const rows = await allVideos(t);
    expect(rows.map((r) => [r.twitchId, r.jobId]).sort()).toEqual([
      ["1111111111", "job_02"],
      [TWITCH_ID, JOB],
    ]);
  });

  test("two concurrent first updates for one video create one row", async () => {
    const t = setup();
    await Promise.all([
      t.mutation(api.video.upsertJobProgress, progressArgs(CREATED, "Queued", 0)),
      t.mutation(api.video.upsertJobProgress, progressArgs(CREATED + 1_000, "Downloading", 1)),
    ]);
    const rows = await allVideos(t);
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ status: "Downloading", updatedAt: CREATED + 1_000 });
  });
});

describe("markCompleted", () => {
  test("sets the terminal state, 100 %, ETA 0, completion time and the final URLs", async () => {
    const t = setup();
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(CREATED + 3_000, "Finding highlights", 95, {
        processingStartedAt: STARTED,
        estimatedCompletionSeconds: 12,
        title: "Friday stream",
      }),
    );
    const result = await t.mutation(
      api.video.markCompleted,
      completedArgs(CREATED + 60_000, { processingStartedAt: STARTED, urls: URLS_ALL }),
    );
    expect(result).toEqual({ applied: true });
    const row = await videoRow(t, TWITCH_ID);
    const { _id, _creationTime, ...fields } = row!;
    expect(fields).toEqual({
      twitchId: TWITCH_ID,
      title: "Friday stream",
      status: "Completed",
      currentStage: "Completed",
      progressPercentage: 100,
      estimatedCompletionSeconds: 0,
      jobId: JOB,
      retryCount: 0,
      createdAt: CREATED,
      updatedAt: CREATED + 60_000,
      processingStartedAt: STARTED,
      processingCompletedAt: CREATED + 60_000,
      ...URLS_ALL,
    });
  });

  test("clears the error of an earlier failed attempt of the same job", async () => {
    const t = setup();
    await t.mutation(api.video.markFailed, failedArgs(CREATED + 5_000, 30));
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(CREATED + 6_000, "Downloading", 31, { retryCount: 1 }),
    );
    await t.mutation(api.video.markCompleted, completedArgs(CREATED + 9_000, { retryCount: 1 }));
    const row = await videoRow(t, TWITCH_ID);
    expect(row).toMatchObject({
      status: "Completed",
      retryCount: 1,
      processingCompletedAt: CREATED + 9_000,
    });
    expect(row).not.toHaveProperty("errorType");
    expect(row).not.toHaveProperty("errorMessage");
    expect(row).not.toHaveProperty("isRetryable");
  });
});

describe("markFailed", () => {
  test("sets Failed with the error, keeps the progress reached, clears the ETA", async () => {
    const t = setup();
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(CREATED + 3_000, "Transcribing", 55, { estimatedCompletionSeconds: 300 }),
    );
    const result = await t.mutation(
      api.video.markFailed,
      failedArgs(CREATED + 8_000, 55, {
        errorType: "transcription_failed",
        errorMessage: "Deepgram refused the audio.",
        isRetryable: false,
        urls: URLS_PARTIAL,
      }),
    );
    expect(result).toEqual({ applied: true });
    const row = await videoRow(t, TWITCH_ID);
    expect(row).toMatchObject({
      status: "Failed",
      currentStage: "Failed",
      progressPercentage: 55,
      errorType: "transcription_failed",
      errorMessage: "Deepgram refused the audio.",
      isRetryable: false,
      processingCompletedAt: CREATED + 8_000,
      updatedAt: CREATED + 8_000,
      ...URLS_PARTIAL,
    });
    expect(row).not.toHaveProperty("estimatedCompletionSeconds");
  });

  test("a progress update of a retried attempt clears the error and the completion time", async () => {
    const t = setup();
    await t.mutation(api.video.markFailed, failedArgs(CREATED + 8_000, 55));
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(CREATED + 9_000, "Downloading", 0, { retryCount: 1 }),
    );
    const row = await videoRow(t, TWITCH_ID);
    expect(row).toMatchObject({ status: "Downloading", retryCount: 1 });
    for (const field of ["errorType", "errorMessage", "isRetryable", "processingCompletedAt"]) {
      expect(row).not.toHaveProperty(field);
    }
  });
});

describe("markCancelled", () => {
  test("sets Cancelled with the progress reached, no ETA and no error", async () => {
    const t = setup();
    await t.mutation(
      api.video.upsertJobProgress,
      progressArgs(CREATED + 3_000, "Fetching chat", 20, { estimatedCompletionSeconds: 500 }),
    );
    const result = await t.mutation(api.video.markCancelled, cancelledArgs(CREATED + 4_000, 21));
    expect(result).toEqual({ applied: true });
    const row = await videoRow(t, TWITCH_ID);
    expect(row).toMatchObject({
      status: "Cancelled",
      currentStage: "Cancelled",
      progressPercentage: 21,
      processingCompletedAt: CREATED + 4_000,
      updatedAt: CREATED + 4_000,
    });
    for (const field of [
      "estimatedCompletionSeconds",
      "errorType",
      "errorMessage",
      "isRetryable",
    ]) {
      expect(row).not.toHaveProperty(field);
    }
  });

  test("on a video with no row yet, creates it in the cancelled state", async () => {
    const t = setup();
    await t.mutation(api.video.markCancelled, cancelledArgs(CREATED + 100, 0));
    const rows = await allVideos(t);
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({
      twitchId: TWITCH_ID,
      status: "Cancelled",
      jobId: JOB,
      progressPercentage: 0,
    });
  });
});
